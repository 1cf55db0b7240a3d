"""Speed of the virtual-time engine: `python -m pools.sim.bench [--engines 8] [--requests 10000]`.

An agent-like open-loop load (shared system prompts, growing contexts, lognormal outputs, Poisson
arrivals) spread round-robin over N engines, run to completion on one core; prints wall time and
what the simulated cluster did.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from pools.sim.engine import SimEngine
from pools.sim.request import SimRequest
from pools.sim.virtual import Arrival, run_trace


def workload(n: int, engines: int, rate: float, seed: int) -> list[Arrival]:
    """n requests at `rate` req/s: 20 apps (shared 1-4k-token prefixes), each call extends a session."""
    rng = random.Random(seed)
    t = 0.0
    out: list[Arrival] = []
    sessions: dict[int, list[int]] = {}
    for i in range(n):
        t += rng.expovariate(rate)
        app = rng.randrange(20)
        sess = rng.randrange(200)
        ids = sessions.setdefault(sess, [1000 + app, 2000 + app])  # system prompt blocks of the app
        ids.append(10_000 + i)  # this call's new content extends the session's context
        if len(ids) > 24:
            ids[2:] = ids[-4:]
        prompt = 512 * len(ids) - rng.randrange(512)
        output = max(1, min(2000, int(rng.lognormvariate(5.0, 0.8))))
        req = SimRequest.synthetic(f"r{i}", prompt, hash_ids=ids, output_tokens=output, max_tokens=output)
        out.append(Arrival(t, req, engine=sess % engines))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a JSON summary."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=16.0, help="arrivals per second over the whole cluster")
    p.add_argument("--preset", default="llama-3.1-8b-a100")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    arrivals = workload(args.requests, args.engines, args.rate, args.seed)
    engines = [SimEngine.from_preset(args.preset, seed=args.seed) for _ in range(args.engines)]
    t0 = time.perf_counter()
    res = run_trace(engines, arrivals)
    wall = time.perf_counter() - t0
    ttfts = sorted(r.ttft for r in res.values() if r.ttft is not None)
    summary = {
        "engines": args.engines,
        "requests": len(res),
        "wall_s": round(wall, 2),
        "simulated_s": round(max(r.finish_time or 0 for r in res.values()), 1),
        "steps": sum(e.num_steps for e in engines),
        "output_tokens": sum(r.output_tokens for r in res.values()),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p99_s": round(ttfts[int(0.99 * (len(ttfts) - 1))], 3),
        "prefix_hit_rate": round(
            sum(e.metrics.prefix_cache_hits for e in engines)
            / max(1, sum(e.metrics.prefix_cache_queries for e in engines)),
            3,
        ),
        "preemptions": sum(e.metrics.num_preemptions for e in engines),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
