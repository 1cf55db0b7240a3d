"""`pythia sim-engine`: one simulated vLLM replica on a port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from pools.sim.engine import EngineConfig, SimEngine
from pools.sim.presets import load_preset, preset_names
from pools.sim.server import EngineRunner, SimServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pythia sim-engine", description="Simulated vLLM engine (OpenAI API + vLLM metrics)"
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--preset", default="llama-3.1-8b-a100", help=f"name ({', '.join(preset_names())}) or YAML path"
    )
    p.add_argument("--model", default="", help="served model name (default: the preset's model)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache over all TP ranks, GiB")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="run this many times faster than the modelled GPU"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    p.add_argument("--log-level", default="WARNING")
    return p


def make_engine(args: argparse.Namespace) -> SimEngine:
    """The engine the CLI arguments describe."""
    preset = load_preset(args.preset)
    e = preset.engine
    cfg = EngineConfig(
        kv_cache_gb=args.kv_cache_gb if args.kv_cache_gb is not None else preset.kv_cache_gb(),
        block_size=args.block_size or e.block_size,
        max_num_seqs=args.max_num_seqs or e.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens or e.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        seed=args.seed,
        model_name=args.model,
        token_events=True,
    )
    return SimEngine(preset, cfg)


async def _serve(args: argparse.Namespace) -> None:
    engine = make_engine(args)
    server = SimServer(EngineRunner(engine, args.time_scale), engine.preset.name)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    print(
        f"sim-engine {engine.preset.name} serving {engine.model_name} on http://{args.host}:{args.port} "
        f"({engine.num_gpu_blocks} KV blocks x {engine.block_size} tokens, time scale {args.time_scale})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run one simulated engine until SIGINT/SIGTERM."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        make_engine(args)  # fail fast on a bad preset or size
    except ValueError as e:
        print(f"pythia sim-engine: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(_serve(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
