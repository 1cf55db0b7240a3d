"""Virtual-time harness: the gateway's routing core and predictor driving simulated engines, no sockets.

Per call it does what the live gateway does: extract features from the request body, ask the
predictor, `route()` with the policy, honour `Decision.queue` (a per-pool admission queue that is
re-routed when a call of the pool completes), forward `Decision.priority` to the engine, send
`Decision.prewarm` prefills (max_tokens=1), keep each `ReplicaState`'s in-flight counts and KV
reservations exact, "scrape" engine gauges every `scrape_interval_s`, and report each outcome back
to the predictor. Engines are `pools.sim.SimEngine`s advanced in one discrete-event loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loadgen.metrics import EngineCounters, RequestRecord, WorkflowRecord
from loadgen.workflow import Call, Workflow
from pools.admission import DEFAULT_TIMEOUT_S, AdmissionQueue, Waiting, overflow_policy
from pools.request_features import InvalidRequest, extract_features
from pools.routing.base import Decision, Policy, RoutingContext, RoutingState
from pools.routing.policies import make_policy
from pools.routing.reconcile import after_scrape
from pools.routing.router import route
from pools.sim import EventKind, RequestRejected, SimEngine, SimRequest
from pools.types import ClusterView, PoolConfig, ReplicaState
from predictor.types import Outcome, Prediction, RequestFeatures, Tags

DEFAULT_PRESET = "llama-3.1-8b-a100"

_ARRIVE, _READY, _SCRAPE, _ADMIT_TIMEOUT = 0, 1, 2, 3


@dataclass(slots=True, frozen=True)
class PoolSpec:
    """One simulated pool: `replicas` engines of `preset` serving contexts up to `max_context_tokens`."""

    name: str
    replicas: int
    max_context_tokens: int
    preset: str = DEFAULT_PRESET


def parse_pools(spec: str, preset: str = DEFAULT_PRESET) -> list[PoolSpec]:
    """`name:replicas:max_context[:preset],...`, e.g. `short:6:16384,long:2:131072`; k suffix allowed."""
    out: list[PoolSpec] = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (3, 4) or not fields[0]:
            raise ValueError(f"bad pool spec {part!r}: expected name:replicas:max_context[:preset]")
        try:
            n = int(fields[1])
            ctx_s = fields[2].lower()
            ctx = int(float(ctx_s[:-1]) * 1024) if ctx_s.endswith("k") else int(ctx_s)
        except ValueError:
            raise ValueError(f"bad pool spec {part!r}: replicas and max_context must be integers") from None
        if n < 1 or ctx < 1:
            raise ValueError(f"bad pool spec {part!r}: replicas and max_context must be >= 1")
        out.append(PoolSpec(fields[0], n, ctx, fields[3] if len(fields) == 4 else preset))
    if len({p.name for p in out}) != len(out):
        raise ValueError(f"pool names repeat in {spec!r}")
    return out


def default_pools(replicas: int = 8, preset: str = DEFAULT_PRESET) -> list[PoolSpec]:
    """The benchmark cluster: three quarters short (16k) replicas, the rest long (128k); 1 replica = one long pool."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    if replicas == 1:
        return [PoolSpec("long", 1, 131072, preset)]
    short = max(1, round(replicas * 0.75))
    short = min(short, replicas - 1)
    return [PoolSpec("short", short, 16384, preset), PoolSpec("long", replicas - short, 131072, preset)]


@dataclass(slots=True)
class SimConfig:
    """What to simulate: the cluster, the policy and the gateway-side knobs."""

    pools: list[PoolSpec] = field(default_factory=default_pools)
    policy: str = "least_loaded"
    model: str = "llama-3.1-8b"
    seed: int = 0
    scrape_interval_s: float = 1.0  # PYTHIA_METRICS_SCRAPE_INTERVAL_S default
    use_predictor: bool = True
    predictor_settings: dict[str, Any] = field(default_factory=dict)
    admission_aging_s: float = 10.0
    # as the gateway's PYTHIA_ADMISSION_TIMEOUT_S: a call queued this long is placed without the room
    # filters and waits in the engine's queue instead (inf: it waits at the gateway until there is room)
    admission_timeout_s: float = DEFAULT_TIMEOUT_S
    engine_overrides: dict[str, Any] = field(default_factory=dict)  # kv_cache_gb, max_num_seqs, ...
    scheduling_policy: str = "auto"  # auto: priority when the policy sets priorities, else fcfs (vLLM default)
    max_virtual_s: float = math.inf  # stop the clock here (unfinished work is reported as such)


@dataclass(slots=True)
class SimStats:
    """What the harness itself counted."""

    wall_s: float = 0.0
    virtual_s: float = 0.0
    routed: int = 0
    queued: int = 0
    requeued: int = 0
    overflowed: int = 0  # queued calls placed without the room filters after admission_timeout_s
    prewarms_sent: int = 0
    prewarms_rejected: int = 0
    rejected: int = 0
    engine_steps: int = 0
    per_pool_calls: dict[str, int] = field(default_factory=dict)
    per_replica_calls: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def replica_url(pool: str, index: int) -> str:
    """The URL the harness gives the `index`-th simulated replica of `pool` (what `RequestRecord.replica` holds)."""
    return f"http://sim-{pool}-{index}"


@dataclass(slots=True)
class SimResult:
    requests: list[RequestRecord]
    workflows: list[WorkflowRecord]
    engine: EngineCounters
    stats: SimStats


@dataclass(slots=True)
class _Wf:
    wf: Workflow
    rec: WorkflowRecord
    waiting: list[int]  # unfinished dependencies per call
    ok: list[bool]
    dependents: list[list[int]]
    resolved: int = 0


@dataclass(slots=True)
class _Live:
    """One call between its scheduled send and its completion."""

    wf: _Wf
    call: Call
    rec: RequestRecord
    features: RequestFeatures
    tags: Tags
    prediction: Prediction
    ctx: RoutingContext
    body_text: str
    decision: Decision | None = None
    replica: ReplicaState | None = None
    reserve: int = 0
    expected: int = 0
    queued_at: float = -1.0


class Simulation:
    """One run of a list of workflows through one policy on a fresh simulated cluster."""

    def __init__(self, cfg: SimConfig, workflows: Sequence[Workflow], policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.workflows = sorted(workflows, key=lambda w: w.arrival_s)
        self.policy = policy or make_policy(cfg.policy)
        self.overflow_policy = overflow_policy(self.policy)
        sched = cfg.scheduling_policy
        if sched == "auto":
            sched = "priority" if self.policy.priority is not None else "fcfs"
        self.engines: dict[str, SimEngine] = {}
        configs: list[PoolConfig] = []
        n = 0
        for p in cfg.pools:
            urls = []
            for i in range(p.replicas):
                url = replica_url(p.name, i)
                self.engines[url] = SimEngine.from_preset(p.preset, seed=cfg.seed * 1000 + n, model_name=cfg.model,
                                                          scheduling_policy=sched, **cfg.engine_overrides)
                urls.append(url)
                n += 1
            configs.append(PoolConfig(p.name, p.max_context_tokens, (cfg.model,), tuple(urls)))
        self.view = ClusterView.from_configs(configs)
        self.replicas: dict[str, ReplicaState] = {r.url: r for pool in self.view.pools for r in pool.replicas}
        self.urls = list(self.engines)
        self.state = RoutingState()
        self.queues: dict[str, AdmissionQueue[_Live]] = {
            p.name: AdmissionQueue(aging_s=cfg.admission_aging_s) for p in self.view.pools
        }
        self.predictor: Any = None
        if cfg.use_predictor:
            from predictor.api import make_predictor

            self.predictor = make_predictor("", **cfg.predictor_settings)
        self.stats = SimStats()
        self.requests: list[RequestRecord] = []
        self.wf_records: list[WorkflowRecord] = []
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = itertools.count()
        self._inflight: dict[str, _Live] = {}
        self._warm_ids: set[str] = set()
        self._rid = itertools.count()
        self._next: dict[str, float] = dict.fromkeys(self.engines, math.inf)
        self._open_workflows = 0

    # ------------------------------------------------------------------ loop

    def run(self) -> SimResult:
        """Run to completion (or `max_virtual_s`) and return the records."""
        wall0 = time.perf_counter()
        for i, wf in enumerate(self.workflows):
            self._push(wf.arrival_s, _ARRIVE, i)
        self._scrape(0.0)
        self._push(self.cfg.scrape_interval_s, _SCRAPE, None)
        now = 0.0
        limit = self.cfg.max_virtual_s
        nxt = self._next
        while True:
            t_eng, url = math.inf, ""
            for u, t in nxt.items():
                if t < t_eng:
                    t_eng, url = t, u
            t_ev = self._heap[0][0] if self._heap else math.inf
            if t_eng == math.inf and (t_ev == math.inf or self._only_scrapes_left()):
                break
            t = min(t_eng, t_ev)
            if t > limit:
                break
            now = t
            if t_eng <= t_ev:
                self._engine_events(url, t_eng)
                continue
            _, _, kind, obj = heapq.heappop(self._heap)
            if kind == _ARRIVE:
                self._arrive(self.workflows[obj], t)
            elif kind == _READY:
                self._send(obj, t)
            elif kind == _ADMIT_TIMEOUT:
                self._admission_timeout(obj, t)
            else:
                self._scrape(t)
                if self.predictor is not None:
                    self.predictor.tick(t)
                self._drain_all(t)
                self._push(t + self.cfg.scrape_interval_s, _SCRAPE, None)
        self.stats.virtual_s = now
        self.stats.wall_s = time.perf_counter() - wall0
        self.stats.engine_steps = sum(e.num_steps for e in self.engines.values())
        q = h = p = 0.0
        for e in self.engines.values():
            snap = e.metrics_snapshot()
            q += snap["vllm:prefix_cache_queries_total"]
            h += snap["vllm:prefix_cache_hits_total"]
            p += snap["vllm:num_preemptions_total"]
        for live in self._inflight.values():  # cut off by max_virtual_s
            live.rec.error = "unfinished"
        return SimResult(self.requests, self.wf_records, EngineCounters(q, h, p, "sim"), self.stats)

    def _only_scrapes_left(self) -> bool:
        if self._open_workflows > 0 or any(len(q) for q in self.queues.values()):
            return False
        return all(kind == _SCRAPE for _, _, kind, _ in self._heap)

    def _push(self, t: float, kind: int, obj: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, obj))

    def _refresh_next(self, url: str) -> None:
        t = self.engines[url].next_event_time()
        self._next[url] = math.inf if t is None else t

    # ------------------------------------------------------------------ workflows

    def _arrive(self, wf: Workflow, t: float) -> None:
        rec = WorkflowRecord(wf.workflow_id, wf.app, wf.arrival_s, calls=len(wf.calls))
        self.wf_records.append(rec)
        state = _Wf(wf, rec, [len(c.depends_on) for c in wf.calls], [False] * len(wf.calls), wf.dependents())
        self._open_workflows += 1
        for c in wf.calls:
            if not c.depends_on:
                self._schedule(state, c, t + c.think_time_s)

    def _schedule(self, wfs: _Wf, call: Call, at: float) -> None:
        rec = RequestRecord(call.workflow_id, call.app, call.role, call.index, scheduled_s=at,
                            expected_output_tokens=call.output_tokens)
        self.requests.append(rec)
        self._push(at, _READY, (wfs, call, rec))

    def _resolve(self, wfs: _Wf, call: Call, ok: bool, t: float) -> None:
        wfs.ok[call.index] = ok
        wfs.resolved += 1
        if not ok:
            wfs.rec.failed_calls += 1
        wfs.rec.end_s = max(wfs.rec.end_s, t)
        for d in wfs.dependents[call.index]:
            wfs.waiting[d] -= 1
            if wfs.waiting[d] == 0:
                dep = wfs.wf.calls[d]
                if all(wfs.ok[i] for i in dep.depends_on):
                    self._schedule(wfs, dep, t + dep.think_time_s)
                else:  # a failed step ends its branch, as the live driver does
                    self._resolve(wfs, dep, False, t)
        if wfs.resolved == len(wfs.wf.calls) and not wfs.rec.done:
            wfs.rec.done = True
            self._open_workflows -= 1

    # ------------------------------------------------------------------ calls

    def _send(self, item: tuple[_Wf, Call, RequestRecord], t: float) -> None:
        wfs, call, rec = item
        body = call.body(stream=True, model=self.cfg.model)
        try:
            features = extract_features(body, call.chat, t)
        except InvalidRequest:
            rec.error, rec.status, rec.end_s = "http_400", 400, t
            self._resolve(wfs, call, False, t)
            return
        tags = Tags(call.app, call.workflow_id, call.role, call.session) if call.tagged else Tags()
        prediction = self.predictor.predict(tags, features, t) if self.predictor is not None else Prediction()
        ctx = RoutingContext(features, tags, prediction, t, self.state)
        if call.chat:
            from pools.prefix_hash import flatten_messages

            text = flatten_messages(body["messages"])
        else:
            text = body["prompt"]
        rec.sent_s = t
        rec.prompt_tokens = features.prompt_tokens
        live = _Live(wfs, call, rec, features, tags, prediction, ctx, text)
        self._route(live, t, first=True)

    def _route(self, live: _Live, t: float, first: bool, policy: Policy | None = None) -> bool:
        """Route and dispatch; False when the call (re)enters the admission queue."""
        ctx = live.ctx
        ctx.now = t
        ctx.pool = None
        ctx.prefix_match = None
        d = route(ctx, self.view, policy or self.policy)
        if d.error is not None:
            self._fail(live, t, f"http_{d.error.status}", d.error.status, d.error.message)
            return True
        if d.queue:
            if first:
                live.queued_at = t
                self.stats.queued += 1
                if self.queues[d.pool].push(live, d.priority, t) is None:
                    self._fail(live, t, "http_429", 429, "admission queue full")
                    return True
                if self.cfg.admission_timeout_s < math.inf:
                    self._push(t + self.cfg.admission_timeout_s, _ADMIT_TIMEOUT, (live, d.pool))
            return False
        self._dispatch(live, d, t)
        return True

    def _dispatch(self, live: _Live, d: Decision, t: float) -> None:
        f = live.features
        r = self.replicas[d.replica]
        live.decision, live.replica = d, r
        live.reserve = d.kv_reserve_tokens or f.prompt_tokens + (live.prediction.output_tokens_bound or f.max_tokens or 0)
        live.expected = d.kv_expected_tokens
        if live.queued_at >= 0:
            live.rec.queued_s = t - live.queued_at
        rid = f"r{next(self._rid)}"
        req = SimRequest.from_text(rid, live.body_text, max_tokens=live.call.output_tokens, ignore_eos=True,
                                   priority=d.priority or 0)
        engine = self.engines[r.url]
        try:
            engine.add_request(req, t)
        except RequestRejected as e:
            self.stats.rejected += 1
            self._refresh_next(r.url)
            self._fail(live, t, "http_400", 400, str(e))
            return
        r.inflight += 1
        r.inflight_prompt_tokens += f.prompt_tokens
        r.reserved_kv_tokens += live.reserve
        r.reserved_kv_expected_tokens += live.expected
        self._inflight[rid] = live
        self._refresh_next(r.url)
        self.stats.routed += 1
        self.stats.per_pool_calls[d.pool] = self.stats.per_pool_calls.get(d.pool, 0) + 1
        self.stats.per_replica_calls[r.url] = self.stats.per_replica_calls.get(r.url, 0) + 1
        live.rec.replica = r.url
        for a in d.prewarm:
            self._prewarm(a.replica, a.messages, t, d.priority or 0)

    def _prewarm(self, url: str, messages: Sequence[dict[str, str]], t: float, priority: int) -> None:
        engine = self.engines.get(url)
        if engine is None:
            return
        rid = f"w{next(self._rid)}"
        try:
            engine.add_request(SimRequest.from_messages(rid, messages, max_tokens=1, priority=priority), t)
        except RequestRejected:
            self.stats.prewarms_rejected += 1
            return
        self._warm_ids.add(rid)
        self.stats.prewarms_sent += 1
        self._refresh_next(url)

    def _fail(self, live: _Live, t: float, kind: str, status: int, detail: str = "") -> None:
        live.rec.error, live.rec.status, live.rec.end_s = kind, status, t
        live.rec.detail = detail[:300]
        self._resolve(live.wf, live.call, False, t)

    # ------------------------------------------------------------------ engines

    def _engine_events(self, url: str, until: float) -> None:
        engine = self.engines[url]
        events = engine.advance(until)
        self._refresh_next(url)
        freed = False
        for ev in events:
            if ev.request_id in self._warm_ids:
                if ev.kind is EventKind.FINISHED:
                    self._warm_ids.discard(ev.request_id)
                    engine.pop_result(ev.request_id)
                continue
            live = self._inflight.get(ev.request_id)
            if live is None:
                continue
            if ev.kind is EventKind.FIRST_TOKEN:
                live.rec.first_token_s = ev.time
            elif ev.kind is EventKind.PREEMPTED:
                live.rec.preemptions += 1
            elif ev.kind is EventKind.FINISHED:
                del self._inflight[ev.request_id]
                res = engine.pop_result(ev.request_id)
                self._complete(live, ev.time, res)
                freed = True
        if freed:
            self._drain(self.replicas[url].pool, until)

    def _complete(self, live: _Live, t: float, res: Any) -> None:
        rec, r, f = live.rec, live.replica, live.features
        assert r is not None and live.decision is not None
        r.inflight -= 1
        r.inflight_prompt_tokens -= f.prompt_tokens
        r.reserved_kv_tokens -= live.reserve
        r.reserved_kv_expected_tokens -= live.expected
        rec.ok, rec.status, rec.end_s = True, 200, t
        if res is not None:
            rec.output_tokens = res.output_tokens
            rec.cached_tokens = res.cached_tokens
            rec.prompt_tokens = res.prompt_tokens
            if rec.first_token_s is None and res.first_token_time is not None:
                rec.first_token_s = res.first_token_time
        else:
            rec.output_tokens = live.call.output_tokens
        if rec.first_token_s is None:
            rec.first_token_s = t
        if self.predictor is not None:
            outcome = Outcome(ok=True, prompt_tokens=rec.prompt_tokens, output_tokens=rec.output_tokens,
                              cached_tokens=rec.cached_tokens, ttft_s=max(0.0, rec.first_token_s - f.arrival_s),
                              e2e_s=t - f.arrival_s, finished_s=t, replica=r.url, pool=live.decision.pool)
            self.predictor.observe(live.tags, f, live.prediction, outcome)
        self._resolve(live.wf, live.call, True, t)

    def _drain(self, pool: str, t: float) -> None:
        """A call of `pool` completed: admit queued calls in priority order while the router places them."""
        q = self.queues.get(pool)
        while q:
            w: Waiting[_Live] | None = q.pop()
            if w is None:
                break
            if not self._route(w.item, t, first=False):
                q.requeue(w)
                self.stats.requeued += 1
                break

    def _admission_timeout(self, item: tuple[_Live, str], t: float) -> None:
        """A queued call's wait ran out: if it is still queued, place it without the room filters."""
        live, pool = item
        if not self.queues[pool].remove(live):
            return  # placed (or failed) meanwhile
        self.stats.overflowed += 1
        if not self._route(live, t, first=False, policy=self.overflow_policy):
            # no room filter is left to ask for a wait: only a pool without a healthy replica gets here
            self._fail(live, t, "http_503", 503, f"pool '{pool}' cannot take the call now")

    def _drain_all(self, t: float) -> None:
        for name in self.queues:
            self._drain(name, t)

    def _scrape(self, t: float) -> None:
        """What the gateway's metrics scraper would have read from every engine at `t`."""
        for url, e in self.engines.items():
            r = self.replicas[url]
            r.num_running = e.num_running
            r.num_waiting = e.num_waiting
            r.kv_usage = e.kv_usage
            m = e.metrics
            r.prefix_cache_queries = float(m.prefix_cache_queries)
            r.prefix_cache_hits = float(m.prefix_cache_hits)
            r.num_preemptions = float(m.num_preemptions)
            r.max_num_seqs = e.max_num_seqs
            capacity_changed = r.kv_capacity_tokens != e.kv_capacity_tokens
            r.kv_capacity_tokens = e.kv_capacity_tokens
            after_scrape(self.state, r, capacity_changed, self.policy.uses_prefix_index)
            r.last_scrape_s = t


def simulate(cfg: SimConfig, workflows: Sequence[Workflow]) -> SimResult:
    """Run `workflows` through `cfg.policy` on a fresh simulated cluster."""
    return Simulation(cfg, workflows).run()
