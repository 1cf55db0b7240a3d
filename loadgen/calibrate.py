"""Cluster capacity for `--load`: saturated workflow throughput, measured in the simulator.

Capacity = workflows completed per second while the cluster is saturated. Calibration sends
`n` workflows of the same workload (think times zeroed: tool time uses no GPU) all at t=0 to
the same simulated cluster under `least_loaded` routing (a neutral reference, no prediction) and
divides the workflows done by the time they took: per context pool (each workflow counts for the
pool that served its last call), `QUANTILE` of that pool's workflows over the time by which they had
completed, divided by the pool's share of the workflows. The cluster's capacity is the smallest of
these, the bottleneck pool's. Stopping at the 90th percentile leaves out each pool's drain tail.
Two earlier estimators overstated capacity and are why it is done this way: the completion rate
between the 20th and 80th percentile of completions measures how tightly completions bunch, and
engines that share their batch among all running calls finish a burst's workflows almost together
(deep_research: every completion between 199 s and 263 s, a "rate" 8x the real one); and a
cluster-wide window is filled by the fast pool's workflows while the slow pool's backlog finishes
after it (mixed on 6 short + 2 long: 2x, the long pool then queued without bound at "50%" load).
`--load L` then offers L x capacity workflows/s. Results are cached on disk, keyed by everything
that changes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen.simulate import SimConfig, replica_url, simulate
from loadgen.workflow import Workflow

REFERENCE_POLICY = "least_loaded"
QUANTILE = 0.9


@dataclass(slots=True, frozen=True)
class Capacity:
    """Measured saturated throughput and how it was measured."""

    workflows_per_s: float
    requests_per_s: float
    workflows: int
    window_s: float
    policy: str = REFERENCE_POLICY
    cached: bool = False
    bottleneck: str = ""  # the pool whose saturated rate sets the capacity
    per_pool_workflows_per_s: dict[str, float] = dataclasses.field(default_factory=dict)  # what each pool alone sustains

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return dataclasses.asdict(self)


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pythia-loadgen" / "calibration.json"


def _zero_think(wfs: list[Workflow]) -> list[Workflow]:
    out = []
    for w in wfs:
        calls = [dataclasses.replace(c, think_time_s=0.0) for c in w.calls]
        out.append(dataclasses.replace(w, calls=calls, arrival_s=0.0))
    return out


def measure_capacity(
    make_workflows: Callable[[int], list[Workflow]],
    cfg: SimConfig,
    n: int,
    cache_key: str = "",
) -> Capacity:
    """Saturated throughput of `cfg`'s cluster for the workflows `make_workflows(n)` returns."""
    key = ""
    if cache_key:
        pools = [dataclasses.asdict(p) for p in cfg.pools]
        raw = json.dumps([cache_key, n, pools, cfg.model, cfg.engine_overrides, cfg.seed, 4], sort_keys=True)
        key = hashlib.sha256(raw.encode()).hexdigest()[:32]
        cached = _read_cache().get(key)
        if cached:
            return Capacity(**{**cached, "cached": True})
    wfs = _zero_think(make_workflows(n))
    ref = dataclasses.replace(cfg, policy=REFERENCE_POLICY, use_predictor=False)
    res = simulate(ref, wfs)
    pool_of_replica = {replica_url(p.name, i): p.name for p in cfg.pools for i in range(p.replicas)}
    last: dict[str, tuple[float, str]] = {}
    for r in res.requests:
        if r.ok and r.end_s >= last.get(r.workflow_id, (-1.0, ""))[0]:
            last[r.workflow_id] = (r.end_s, pool_of_replica.get(r.replica, ""))
    ends: dict[str, list[float]] = {}
    done = [w for w in res.workflows if w.ok]
    for w in done:
        ends.setdefault(last.get(w.workflow_id, (0.0, ""))[1], []).append(w.end_s)
    if len(done) < 5:
        raise ValueError("calibration failed: too few workflows completed (is the workload too large for the cluster?)")
    if all(len(t) < 5 for t in ends.values()):
        ends = {"": [w.end_s for w in done]}  # no pool has enough to measure alone: the cluster as one
    per_pool: dict[str, float] = {}
    spans: dict[str, float] = {}
    for pool, times in ends.items():
        if len(times) < 5:
            continue  # too few to measure; such a pool carries a small share and is not the bottleneck
        times.sort()
        k = max(1, int(len(times) * QUANTILE))
        spans[pool] = max(times[k - 1], 1e-9)
        share = len(times) / len(done)
        per_pool[pool] = k / spans[pool] / share
    bottleneck = min(per_pool, key=per_pool.__getitem__)
    wps = per_pool[bottleneck]
    calls_per_wf = sum(len(w.calls) for w in wfs) / len(wfs)
    cap = Capacity(wps, wps * calls_per_wf, n, spans[bottleneck], bottleneck=bottleneck,
                   per_pool_workflows_per_s=per_pool)
    if key:
        _write_cache(key, cap)
    return cap


def _read_cache() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, cap: Capacity) -> None:
    path = _cache_path()
    try:
        data = _read_cache()
        d = cap.as_dict()
        d.pop("cached", None)
        data[key] = d
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a re-calibration next time
