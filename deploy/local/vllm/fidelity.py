"""Simulator fidelity: one short Mooncake-shaped workload on real vLLM and on the simulated engine, compared.

    deploy/local/vllm-cpu.sh --ports 8101
    .venv/bin/python deploy/local/vllm/fidelity.py --url http://127.0.0.1:8101 \
        --preset smollm2-135m-cpu --out docs/results/sim-fidelity-cpu.json

The workload is N requests of the sample trace (from line `--offset`), scaled to fit a 2048-token model:
every 512-token hash block becomes `--block-tokens` tokens (prompt lengths scale the same way),
outputs are scaled by `--output-scale`, and arrival times are stretched by `--time-scale` so the
CPU engine is loaded but not swamped. Real vLLM gets the prompts as token ids (equal hash ids,
equal tokens, see token_prompts.py) through /v1/completions with ignore_eos, so both engines see
exactly the same lengths and shared prefixes. The simulator runs the same requests in virtual
time (`SimRequest.synthetic`, the same hash-block rule) with the engine settings vLLM ran with.
Compared: mean and p50/p90 TTFT, mean and p90 end-to-end latency, output-token throughput and
the prefix-cache hit rate (vLLM's own counters vs the simulator's). `--real-json` reuses a
previous real run so a preset can be re-checked without running vLLM again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_timing import scrape_counters, stream_completion
from token_prompts import prompt_token_ids

ROOT = Path(__file__).resolve().parents[3]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
HITS, QUERIES = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


@dataclass(slots=True)
class Req:
    """One scaled trace request."""

    rid: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: list[int]


@dataclass(slots=True)
class Outcome:
    rid: str
    arrival_s: float
    ttft_s: float
    e2e_s: float
    output_tokens: int
    cached_tokens: int


def load_workload(
    trace: Path,
    n: int,
    block_tokens: int,
    output_scale: float,
    time_scale: float,
    max_len: int,
    offset: int = 0,
) -> list[Req]:
    """n trace lines from `offset`, scaled: 512-token blocks -> block_tokens, outputs x output_scale, time x time_scale."""
    scale = block_tokens / 512.0
    out: list[Req] = []
    t0: float | None = None
    with trace.open() as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if i >= offset + n:
                break
            row = json.loads(line)
            t0 = row["timestamp"] if t0 is None else t0
            out_tok = max(1, round(row["output_length"] * output_scale))
            prompt = max(1, math.ceil(row["input_length"] * scale))
            prompt = min(prompt, max_len - out_tok)
            arrival = (row["timestamp"] - t0) / 1000.0 * time_scale
            out.append(Req(f"r{i}", arrival, prompt, out_tok, list(row["hash_ids"])))
    return out


async def run_real(url: str, model: str, reqs: list[Req], block_tokens: int) -> dict[str, Any]:
    """Send the workload open-loop to a real engine; per-request timings and counter deltas.

    The prompts get a fresh salt, so nothing an earlier run left in vLLM's cache is reused.
    """
    salt = uuid.uuid4().hex[:12]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        before = await scrape_counters(session, url, (HITS, QUERIES))
        t0 = time.perf_counter() + 0.5

        async def one(r: Req) -> Outcome:
            body = {
                "model": model,
                "prompt": prompt_token_ids(r.rid, r.prompt_tokens, r.hash_ids, block_tokens, salt),
                "max_tokens": r.output_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            }
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
            start = t0 + r.arrival_s
            t = await stream_completion(session, url, body)
            if t.error:
                raise RuntimeError(f"{r.rid}: {t.status} {t.error}")
            return Outcome(
                r.rid, r.arrival_s, t.first_token - start, t.end - start, t.completion_tokens, t.cached_tokens
            )

        outcomes = await asyncio.gather(*(one(r) for r in reqs))
        after = await scrape_counters(session, url, (HITS, QUERIES))
    return {
        "outcomes": [asdict(o) for o in outcomes],
        "prefix_hits": after[HITS] - before[HITS],
        "prefix_queries": after[QUERIES] - before[QUERIES],
        "salt": salt,
    }


def run_sim(preset: str, reqs: list[Req], block_tokens: int, engine_args: dict[str, Any]) -> dict[str, Any]:
    """The same workload on the simulated engine in virtual time."""
    from pools.sim import SimEngine, SimRequest
    from pools.sim.virtual import Arrival, run_trace

    engine = SimEngine.from_preset(preset, seed=0, **engine_args)
    arrivals = [
        Arrival(
            r.arrival_s,
            SimRequest.synthetic(
                r.rid,
                prompt_tokens=r.prompt_tokens,
                hash_ids=r.hash_ids,
                hash_block_tokens=block_tokens,
                max_tokens=r.output_tokens,
                ignore_eos=True,
            ),
        )
        for r in reqs
    ]
    results = run_trace(engine, arrivals)
    outcomes = []
    for r in reqs:
        res = results[r.rid]
        assert res.ttft is not None and res.e2e is not None
        outcomes.append(Outcome(r.rid, r.arrival_s, res.ttft, res.e2e, res.output_tokens, res.cached_tokens))
    snap = engine.metrics_snapshot()
    return {
        "outcomes": [asdict(o) for o in outcomes],
        "prefix_hits": snap.get(HITS, 0.0),
        "prefix_queries": snap.get(QUERIES, 0.0),
    }


def summarise(run: dict[str, Any]) -> dict[str, float]:
    """TTFT / e2e statistics, throughput over the run's makespan, prefix hit rate."""
    oc = run["outcomes"]
    ttft = np.array([o["ttft_s"] for o in oc])
    e2e = np.array([o["e2e_s"] for o in oc])
    first = min(o["arrival_s"] for o in oc)
    last = max(o["arrival_s"] + o["e2e_s"] for o in oc)
    tokens = sum(o["output_tokens"] for o in oc)
    return {
        "requests": len(oc),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p90_s": float(np.percentile(ttft, 90)),
        "e2e_mean_s": float(e2e.mean()),
        "e2e_p50_s": float(np.percentile(e2e, 50)),
        "e2e_p90_s": float(np.percentile(e2e, 90)),
        "makespan_s": last - first,
        "throughput_tok_s": tokens / (last - first),
        "prefix_hit_rate": run["prefix_hits"] / run["prefix_queries"] if run["prefix_queries"] else 0.0,
    }


ROWS = (
    ("TTFT mean (s)", "ttft_mean_s"),
    ("TTFT p50 (s)", "ttft_p50_s"),
    ("TTFT p90 (s)", "ttft_p90_s"),
    ("e2e mean (s)", "e2e_mean_s"),
    ("e2e p50 (s)", "e2e_p50_s"),
    ("e2e p90 (s)", "e2e_p90_s"),
    ("output throughput (tok/s)", "throughput_tok_s"),
    ("prefix-cache hit rate", "prefix_hit_rate"),
)


def table(real: dict[str, float], sim: dict[str, float]) -> str:
    """Markdown table: real, simulated, relative error."""
    lines = ["| metric | real vLLM | simulator | sim / real - 1 |", "|---|---:|---:|---:|"]
    for label, key in ROWS:
        r, s = real[key], sim[key]
        err = (s / r - 1.0) * 100 if r else float("nan")
        lines.append(f"| {label} | {r:.3f} | {s:.3f} | {err:+.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8101", help="real vLLM replica")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="smollm2-135m-cpu", help="simulator preset (name or YAML path)")
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument(
        "--offset",
        type=int,
        default=3000,
        help="first trace line (3000: the window richest in shared prefixes)",
    )
    p.add_argument("--block-tokens", type=int, default=4, help="tokens per 512-token trace block")
    p.add_argument("--output-scale", type=float, default=0.25)
    p.add_argument("--time-scale", type=float, default=3.0, help="stretch of the trace's arrival times")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--real-json", type=Path, help="reuse the real run stored in this result file")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    reqs = load_workload(
        args.trace,
        args.requests,
        args.block_tokens,
        args.output_scale,
        args.time_scale,
        args.max_model_len,
        args.offset,
    )
    # what deploy/local/vllm-cpu.sh runs vLLM with
    engine_args = {
        "kv_cache_gb": 1.0,
        "block_size": 128,
        "max_num_seqs": 32,
        "max_num_batched_tokens": 2048,
        "scheduling_policy": "priority",
    }
    if args.real_json:
        real = json.loads(args.real_json.read_text())["real"]
    else:
        t = time.perf_counter()
        real = asyncio.run(run_real(args.url.rstrip("/"), args.model, reqs, args.block_tokens))
        print(f"real run: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    sim = run_sim(args.preset, reqs, args.block_tokens, engine_args)
    rs, ss = summarise(real), summarise(sim)
    md = table(rs, ss)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["engine"] = engine_args
    config["prompt_tokens_total"] = sum(r.prompt_tokens for r in reqs)
    config["output_tokens_total"] = sum(r.output_tokens for r in reqs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "config": config,
                "results": {"real": {"summary": rs}, "sim": {"summary": ss}},
                "real": real,
                "sim": sim,
            },
            indent=1,
        )
        + "\n"
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
