"""Workflow completion time live, side by side: `pythia serve` against the Rust routers users would pick.

For each target, fresh simulated engines (one context class, so every router can use every replica),
the target in front of them, and the same `pythia-loadgen run` (same workload, seed and arrival
times); the results merge into one loadgen result JSON, one entry per target, and one table.
Targets: `pythia:<policy>`, `vllm-router:<policy>` (vllm-project/router) and `sglang-router:<policy>`
(sgl-project's router), the two from PyPI in `.venv-bench` (installed on first use). The virtual-time
comparison (`pythia-loadgen compare`) reimplements the baselines; this runs the real ones, in wall time.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.bench.overhead import Procs, _stop_all, ensure_tools, free_port, rust_router_command, wait_http

MODEL = "llama-3.1-8b"
TARGETS = [
    "pythia:pythia",
    "pythia:round_robin",
    "vllm-router:round_robin",
    "vllm-router:cache_aware",
    "sglang-router:cache_aware",
]


@contextmanager
def engines(n: int, time_scale: float, kv_cache_gb: float, tmp: Path) -> Iterator[list[str]]:
    """`n` fresh simulated engines (empty caches), stopped on exit."""
    procs = Procs()
    try:
        urls = []
        for i in range(n):
            port = free_port()
            cmd = [str(Path(sys.executable).parent / "pythia"), "sim-engine", "--port", str(port), "--seed", str(i),
                   "--time-scale", str(time_scale), "--scheduling-policy", "priority"]
            if kv_cache_gb:
                cmd += ["--kv-cache-gb", str(kv_cache_gb)]
            procs.start(cmd, log=tmp / f"engine-{i}.log")
            urls.append(f"http://127.0.0.1:{port}")
        for u in urls:
            wait_http(u + "/health")
        yield urls
    finally:
        procs.stop()


@contextmanager
def router(name: str, upstreams: list[str], max_context: int, tmp: Path) -> Iterator[str]:
    """Start one target in front of `upstreams`; yield its base URL."""
    kind, _, policy = name.partition(":")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = Procs()
    log = tmp / f"{kind}-{policy}.log"
    try:
        if kind == "pythia":
            pools = [{"name": "all", "max_context_tokens": max_context, "models": [MODEL], "replicas": upstreams}]
            procs.start([str(Path(sys.executable).parent / "pythia"), "serve"], log=log, env={
                "PYTHIA_HOST": "127.0.0.1", "PYTHIA_PORT": str(port), "PYTHIA_WORKERS": "1",
                "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_POLICY": policy, "PYTHIA_LOG_LEVEL": "warning"})
            wait_http(base + "/ready")
        elif kind in ("vllm-router", "sglang-router"):
            cmd, env = rust_router_command(kind, policy, port, upstreams)
            procs.start(cmd, env=env, log=log)
            wait_http(base + "/health")
        else:
            raise ValueError(f"unknown target {name!r}")
        yield base
    finally:
        procs.stop()


def run_one(name: str, a: argparse.Namespace, tmp: Path) -> dict[str, object]:
    """One target on fresh engines; returns its loadgen result entry."""
    from loadgen.cli import main as loadgen_main
    from loadgen.results import load_result

    out = tmp / f"{name.replace(':', '-')}.json"
    with engines(a.replicas, a.time_scale, a.kv_cache_gb, tmp) as ups, router(name, ups, a.max_context, tmp) as url:
        argv = ["run", "--target", url, "--model", MODEL, "--workload", a.workload, "--rate", str(a.rate),
                "--duration", str(a.duration), "--seed", str(a.seed), "--think-scale", str(a.think_scale),
                "--output-scale", str(a.output_scale), "--metrics-url", ",".join(ups), "--no-progress",
                "--out", str(out), *(["--untagged"] if a.untagged else [])]
        print(f"== {name}: pythia-loadgen {' '.join(argv)}", flush=True)
        rc = loadgen_main(argv)
        if rc != 0:
            raise RuntimeError(f"{name}: pythia-loadgen exited {rc} (logs in {tmp})")
    entry: dict[str, object] = load_result(out)["results"]["target"]
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--max-context", type=int, default=131072, help="the replicas' context length (one class)")
    ap.add_argument("--time-scale", type=float, default=2.0, help="engines run this much faster than the modelled A100")
    ap.add_argument("--kv-cache-gb", type=float, default=0.0, help="engine KV cache (0 = the preset's)")
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--rate", type=float, default=3.0, help="workflow arrivals per second")
    ap.add_argument("--duration", type=float, default=45.0, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--think-scale", type=float, default=0.5)
    ap.add_argument("--output-scale", type=float, default=1.0)
    ap.add_argument("--untagged", action="store_true",
                    help="send no X-Pythia-* tags (a drop-in client that changed only its base URL)")
    ap.add_argument("--baseline", default="vllm-router:cache_aware", help="speedup column against this target")
    ap.add_argument("--out", default="docs/results/live-routers.json")
    a = ap.parse_args(argv)
    targets = [t for t in a.targets.split(",") if t]
    if any(not t.startswith("pythia:") for t in targets):
        ensure_tools()
    signal.signal(signal.SIGTERM, _stop_all)

    from loadgen.report import table
    from loadgen.results import make_result, save_result

    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="pythia-live-routers-") as d:
        for name in targets:
            results[name] = run_one(name, a, Path(d))
    config = {"mode": "live-routers", "targets": targets, **{k: v for k, v in vars(a).items() if k != "targets"}}
    doc = make_result(config, results)
    save_result(doc, a.out)
    print(table(doc["results"], a.baseline if a.baseline in results else None))
    print(f"result: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
