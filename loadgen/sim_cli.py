"""`pythia-loadgen simulate` and `compare`: virtual-time runs of the routing core on simulated engines."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen.calibrate import Capacity, measure_capacity
from loadgen.metrics import Slo
from loadgen.simulate import DEFAULT_PRESET, SimConfig, SimResult, default_pools, parse_pools, simulate
from loadgen.workflow import Workflow
from loadgen.workload import DEFAULT_MODEL, ExpandOptions, expand_workload
from pools.admission import DEFAULT_TIMEOUT_S

DEFAULT_WORKFLOWS = 1000
DEFAULT_LOAD = 0.8


def _sim_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=8, help="replicas (3/4 short 16k, 1/4 long 128k) unless --pools")
    p.add_argument("--pools", default="", help="name:replicas:max_context[:preset],... e.g. short:6:16384,long:2:131072")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="simulated engine preset (pools/sim/presets)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--load", default=None,
                   help=f"offered load as a fraction of calibrated capacity (default {DEFAULT_LOAD}; comma list sweeps)")
    p.add_argument("--capacity", type=float, default=None, help="capacity in workflows/s (skips calibration)")
    p.add_argument("--calibration-workflows", type=int, default=0, help="workflows in the calibration burst (default 40 per replica)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="override the preset's KV cache size")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--scrape-interval", type=float, default=1.0, help="virtual seconds between engine-metric scrapes")
    p.add_argument("--no-predictor", action="store_true", help="route without the predictor (cold predictions)")
    p.add_argument("--admission-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="as PYTHIA_ADMISSION_TIMEOUT_S: seconds a call waits for room at the gateway before it goes "
                        "to the engine's own queue (inf: no limit)")
    p.add_argument("--max-virtual-s", type=float, default=float("inf"), help="stop the virtual clock here")


def add_sim_commands(sub: argparse._SubParsersAction, add_workload_opts: Callable[..., None],
                     add_output_opts: Callable[..., None]) -> None:
    s = sub.add_parser("simulate", help="virtual-time run: routing core + predictor + simulated engines")
    add_workload_opts(s)
    add_output_opts(s)
    _sim_opts(s)
    s.add_argument("--policy", default="pythia")
    c = sub.add_parser("compare", help="the same workload, seed and arrivals for each policy, side by side")
    add_workload_opts(c)
    add_output_opts(c)
    _sim_opts(c)
    c.add_argument("--policies", required=True, help="comma-separated policy names")
    c.add_argument("--ablations", action="store_true", help="add every pythia-no-<mechanism> variant")


def _cluster(a: argparse.Namespace) -> SimConfig:
    pools = parse_pools(a.pools, a.preset) if a.pools else default_pools(a.replicas, a.preset)
    overrides: dict[str, Any] = {}
    if a.kv_cache_gb is not None:
        overrides["kv_cache_gb"] = a.kv_cache_gb
    if a.max_num_seqs is not None:
        overrides["max_num_seqs"] = a.max_num_seqs
    return SimConfig(pools=pools, model=a.model, seed=a.seed, scrape_interval_s=a.scrape_interval,
                     use_predictor=not a.no_predictor, engine_overrides=overrides, max_virtual_s=a.max_virtual_s,
                     admission_timeout_s=a.admission_timeout)


def _policies(a: argparse.Namespace) -> list[str]:
    from pools.routing.policies import POLICIES

    if a.command == "simulate":
        names = [a.policy]
    else:
        names = [p.strip() for p in a.policies.split(",") if p.strip()]
        if a.ablations:
            names += [n for n in POLICIES if n.startswith("pythia-no-") and n not in names]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise KeyError(f"unknown policy {unknown[0]!r}; known: {', '.join(sorted(POLICIES))}")
    return names


def _loads(a: argparse.Namespace) -> list[float | None]:
    if a.load is None:
        if a.rate is not None or (a.trace and a.load is None):
            return [None]  # explicit rate, or the trace's own timestamps
        return [DEFAULT_LOAD]
    try:
        loads = [float(x) for x in str(a.load).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--load must be a number or a comma list, got {a.load!r}") from None
    if not loads or any(x <= 0 for x in loads):
        raise ValueError("--load values must be > 0")
    return list(loads)


def _capacity(a: argparse.Namespace, cfg: SimConfig, build: Callable[[argparse.Namespace, str], list[Workflow]],
              trace_wfs: list[Workflow] | None) -> Capacity:
    if a.capacity is not None:
        return Capacity(a.capacity, 0.0, 0, 0.0, policy="given")
    n = a.calibration_workflows or 40 * sum(p.replicas for p in cfg.pools)
    opts = ExpandOptions(model=a.model, prompt_scale=a.prompt_scale, output_scale=a.output_scale,
                         tagged=not a.untagged)
    if trace_wfs is not None:
        src = trace_wfs

        def make(k: int) -> list[Workflow]:
            return src[: min(k, len(src))]

        st = Path(a.trace).stat()
        key = f"trace:{Path(a.trace).resolve()}:{st.st_size}:{st.st_mtime_ns}:{a.limit}"
    else:

        def make(k: int) -> list[Workflow]:
            return expand_workload(a.workload, k, a.seed + 1, opts)  # a different draw than the measured run

        key = f"workload:{a.workload}:{a.seed}:{a.prompt_scale}:{a.output_scale}"
        if Path(a.workload).exists():
            key += f":{Path(a.workload).read_text()}"
    print(f"calibrating capacity: {n} workflows at once under least_loaded ...", file=sys.stderr, flush=True)
    return measure_capacity(make, cfg, n, key)


def run_sim_command(
    a: argparse.Namespace,
    build: Callable[[argparse.Namespace, str], list[Workflow]],
    finish: Callable[[dict[str, Any], argparse.Namespace, str | None], None],
    workload_config: Callable[[argparse.Namespace], dict[str, Any]],
    slo_of: Callable[[argparse.Namespace], Slo],
) -> int:
    """Run `simulate` or `compare` as parsed; prints the table, writes JSON/plots."""
    from tqdm import tqdm

    from loadgen.arrivals import arrival_times
    from loadgen.results import make_result, result_entry

    cfg = _cluster(a)
    policies = _policies(a)
    loads = _loads(a)
    slo = slo_of(a)
    trace_wfs: list[Workflow] | None = None
    if a.trace:
        trace_wfs = build(a, a.model)
    elif a.workflows is None and a.duration is None:
        a.workflows = DEFAULT_WORKFLOWS
    cap: Capacity | None = None
    if any(x is not None for x in loads):
        cap = _capacity(a, cfg, build, trace_wfs)
        pools = ", ".join(f"{k} {v:.3f}" for k, v in sorted(cap.per_pool_workflows_per_s.items()))
        limit = f"; bottleneck pool {cap.bottleneck} (each pool alone: {pools})" if len(cap.per_pool_workflows_per_s) > 1 else ""
        print(f"capacity: {cap.workflows_per_s:.3f} workflows/s ({cap.requests_per_s:.2f} calls/s){limit}"
              f"{' (cached)' if cap.cached else ''}", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    runs = [(p, ld) for ld in loads for p in policies]
    bar = tqdm(total=len(runs), unit="run", desc=a.command, disable=a.no_progress, file=sys.stderr)
    for load in loads:
        wfs, rate = _workflows_at(a, build, trace_wfs, load, cap, arrival_times)
        for pol in policies:
            bar.set_postfix_str(f"{pol} load={load if load is not None else '-'}")
            res: SimResult = simulate(dataclasses.replace(cfg, policy=pol), wfs)
            name = pol if len(loads) == 1 else f"{pol}@{load}"
            results[name] = result_entry(
                res.requests, res.workflows, slo, res.engine,
                extra={"policy": pol, "load": load, "rate_workflows_per_s": rate, "sim": res.stats.as_dict()},
            )
            bar.update(1)
    bar.close()
    config = {
        "mode": a.command,
        **workload_config(a),
        "policies": policies,
        "loads": loads,
        "pools": [dataclasses.asdict(p) for p in cfg.pools],
        "preset": a.preset,
        "model": a.model,
        "engine_overrides": cfg.engine_overrides,
        "scrape_interval_s": cfg.scrape_interval_s,
        "predictor": cfg.use_predictor,
        "capacity": cap.as_dict() if cap else None,
        "slo": dataclasses.asdict(slo),
    }
    doc = make_result(config, results)
    finish(doc, a, policies[0] if a.command == "compare" and len(loads) == 1 else None)
    return 0


def _workflows_at(a: argparse.Namespace, build: Callable[[argparse.Namespace, str], list[Workflow]],
                  trace_wfs: list[Workflow] | None, load: float | None, cap: Capacity | None,
                  arrival_times: Callable[..., list[float]]) -> tuple[list[Workflow], float | None]:
    """The workflows of one load level (the same for every policy)."""
    if trace_wfs is not None:
        if load is None or cap is None:
            return trace_wfs, None
        span = max(w.arrival_s for w in trace_wfs) - min(w.arrival_s for w in trace_wfs)
        natural = len(trace_wfs) / max(span, 1e-9)
        target = load * cap.workflows_per_s
        factor = natural / target  # >1 stretches the trace, <1 compresses it
        t0 = min(w.arrival_s for w in trace_wfs)
        return [dataclasses.replace(w, arrival_s=(w.arrival_s - t0) * factor) for w in trace_wfs], target
    if load is not None and cap is not None:
        ns = argparse.Namespace(**vars(a))
        ns.rate = load * cap.workflows_per_s
        return build(ns, a.model), ns.rate
    if a.rate is None:
        raise ValueError("give --load or --rate")
    return build(a, a.model), a.rate
