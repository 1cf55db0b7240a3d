"""`pythia-loadgen`: run | replay | simulate | compare | report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from loadgen.arrivals import ARRIVALS
from loadgen.dists import TemplateError
from loadgen.metrics import RequestRecord, Slo
from loadgen.traces import TraceError, load_trace
from loadgen.workflow import Workflow
from loadgen.workload import DEFAULT_MODEL, ExpandOptions, builtin_workloads, generate

USAGE_EPILOG = "Result JSON: top-level 'config' and 'results'; results[name]['summary'] (see README)."


# ---------------------------------------------------------------- shared options


def _add_workload_opts(p: argparse.ArgumentParser, required_source: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required_source)
    src.add_argument("--workload", help=f"built-in ({', '.join(builtin_workloads())}) or a YAML file")
    src.add_argument("--trace", help="JSONL trace (Mooncake or workflow form)")
    p.add_argument("--rate", type=float, default=None, help="workflow arrivals per second")
    n = p.add_mutually_exclusive_group()
    n.add_argument("--duration", type=float, default=None, help="send workflows arriving within S seconds")
    n.add_argument("--workflows", type=int, default=None, help="send exactly N workflows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    p.add_argument("--burstiness", type=float, default=0.25, help="gamma shape for --arrival gamma (1 = Poisson)")
    p.add_argument("--speed", type=float, default=1.0, help="trace time compression (2 = twice as fast)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N trace lines")
    p.add_argument("--think-scale", type=float, default=1.0, help="multiply template think/tool times")
    p.add_argument("--prompt-scale", type=float, default=1.0, help="multiply template prompt lengths")
    p.add_argument("--output-scale", type=float, default=1.0, help="multiply template output lengths")
    p.add_argument("--untagged", action="store_true", help="send no X-Pythia-* tags")


def _add_output_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--plot", help="write PNG plots here")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, s (0 = off)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="goodput SLO on time per output token, s (0 = off)")
    p.add_argument("--slo-e2e", type=float, default=0.0, help="goodput SLO on request latency, s (0 = off)")
    p.add_argument("--slo-jct", type=float, default=0.0, help="workflow goodput SLO on JCT, s (0 = off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _slo(a: argparse.Namespace) -> Slo:
    return Slo(a.slo_ttft or None, a.slo_tpot or None, a.slo_e2e or None, a.slo_jct or None)


def _opts(a: argparse.Namespace, model: str) -> ExpandOptions:
    return ExpandOptions(model=model, think_scale=a.think_scale, prompt_scale=a.prompt_scale,
                         output_scale=a.output_scale, tagged=not a.untagged)


def _workload_config(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("workload", "trace", "rate", "duration", "workflows", "seed", "arrival", "burstiness", "speed", "limit",
            "think_scale", "prompt_scale", "output_scale", "untagged")
    return {k: getattr(a, k, None) for k in keys}


def build_workflows(a: argparse.Namespace, model: str) -> list[Workflow]:
    """The workflows a command line describes (template + arrivals, or a trace)."""
    if a.trace:
        wfs = load_trace(a.trace, speed=a.speed, model=model, limit=a.limit, tagged=not a.untagged)
        if a.workflows is not None:
            wfs = wfs[: a.workflows]
        if a.duration is not None:
            wfs = [w for w in wfs if w.arrival_s < a.duration]
        return wfs
    if a.rate is None:
        raise SystemExit("pythia-loadgen: --rate is required with --workload")
    if a.duration is None and a.workflows is None:
        raise SystemExit("pythia-loadgen: give --duration S or --workflows N")
    return generate(a.workload, a.rate, n=a.workflows, duration_s=a.duration, seed=a.seed, arrival=a.arrival,
                    opts=_opts(a, model), burstiness=a.burstiness)


def _metrics_urls(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(u.strip() for u in v.split(",") if u.strip())
    return out


# ---------------------------------------------------------------- run / replay


def _live_parser(sub: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, epilog=USAGE_EPILOG)
    p.add_argument("--target", required=True, help="base URL of an OpenAI-compatible server (gateway, vLLM, sim)")
    p.add_argument("--model", default="", help="model name (default: the first of the target's /v1/models)")
    p.add_argument("--metrics-url", action="append", default=[],
                   help="replica base URLs whose /metrics to diff (repeat or comma-separate); the target and, behind a "
                        "Pythia gateway, its replicas (GET /pythia/replicas) are always tried")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="wait this long for in-flight work at the end")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = e2e)")
    p.add_argument("--max-connections", type=int, default=0, help="client connection cap (0 = none: open loop)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--admin-api-key", default="",
                   help="key for a Pythia gateway's /pythia/replicas (default: --api-key)")
    return p


async def _live(a: argparse.Namespace, mode: str) -> dict[str, Any]:
    from tqdm import tqdm

    from loadgen.driver import Driver, DriverConfig, fetch_models, raise_fd_limit
    from loadgen.results import make_result, result_entry
    from loadgen.scrape import counters_delta, discover_replicas, scrape

    raise_fd_limit()
    model = a.model
    if not model:
        models = await fetch_models(a.target)
        model = models[0] if models else DEFAULT_MODEL
    workflows = build_workflows(a, model)
    if not workflows:
        raise SystemExit("pythia-loadgen: the workload produced no workflows (raise --duration or --rate)")
    total_calls = sum(len(w.calls) for w in workflows)
    # a Pythia gateway lists its replicas: diff their counters too (its own /metrics has no vllm: names)
    urls = list(dict.fromkeys([a.target, *_metrics_urls(a.metrics_url), *await discover_replicas(a.target, a.admin_api_key or a.api_key)]))
    before = await scrape(urls)
    cfg = DriverConfig(target=a.target, tagged=not a.untagged, model=a.model, stream=not a.no_stream,
                       request_timeout_s=a.timeout, max_connections=a.max_connections, api_key=a.api_key,
                       drain_timeout_s=a.drain_timeout)
    bar = tqdm(total=total_calls, unit="req", desc=mode, disable=a.no_progress, smoothing=0.1, mininterval=0.5,
               file=sys.stderr)
    errors = 0

    def progress(r: RequestRecord) -> None:
        nonlocal errors
        bar.update(1)
        if not r.ok:
            errors += 1
            bar.set_postfix_str(f"errors={errors} last={r.error}", refresh=False)

    driver = Driver(cfg, progress)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        if task is not None:
            task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    run_task = loop.create_task(driver.run(workflows))
    try:
        records = await asyncio.shield(run_task)
    except asyncio.CancelledError:
        run_task.cancel()
        records = await run_task
        if not interrupted:
            raise
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        bar.close()
    after = await scrape(urls)
    engine = counters_delta(before, after)
    entry = result_entry(records.requests, records.workflows, _slo(a), engine, records.duration_s,
                         extra={"metrics_endpoints": list(after.endpoints), "cancelled": records.cancelled or interrupted,
                                "client": {"cpu_s": records.client_cpu_s,
                                           "cpu_utilisation": records.client_cpu_s / max(records.duration_s, 1e-9),
                                           "cpu_us_per_request": 1e6 * records.client_cpu_s / max(1, len(records.requests)),
                                           "connections_opened": records.connections_opened}})
    config = {"mode": mode, "target": a.target, "model": model, **_workload_config(a), "slo": asdict(_slo(a)),
              "stream": not a.no_stream, "tagged": not a.untagged, "metrics_urls": urls,
              "started_unix": records.started_wall, "workflows_sent": len(workflows), "calls_planned": total_calls}
    return make_result(config, {"target": entry})


def _finish(doc: dict[str, Any], a: argparse.Namespace, baseline: str | None = None) -> None:
    from loadgen.report import errors_text, plot, table
    from loadgen.results import save_result

    print(table(doc["results"], baseline))
    err = errors_text(doc["results"])
    if err:
        print(err)
    if getattr(a, "out", None):
        save_result(doc, a.out)
        print(f"result: {a.out}")
    if getattr(a, "plot", None):
        plot(doc, a.plot)
        print(f"plots: {a.plot}")


def cmd_live(a: argparse.Namespace, mode: str) -> int:
    import uvloop

    doc = uvloop.run(_live(a, mode))
    _finish(doc, a)
    return 130 if doc["results"]["target"].get("cancelled") else 0


# ---------------------------------------------------------------- report


def cmd_report(a: argparse.Namespace) -> int:
    from loadgen.report import errors_text, plot, table
    from loadgen.results import load_result

    doc = load_result(a.file)
    print(table(doc["results"], a.baseline))
    err = errors_text(doc["results"])
    if err:
        print(err)
    out = a.plot or (a.file[: -len(".json")] if a.file.endswith(".json") else a.file) + ".png"
    plot(doc, out)
    print(f"plots: {out}")
    return 0


# ---------------------------------------------------------------- entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pythia-loadgen", description="Agent-workflow load generator and benchmark")
    sub = p.add_subparsers(dest="command", required=True)

    run = _live_parser(sub, "run", "open-loop workflows against a live endpoint")
    _add_workload_opts(run)
    _add_output_opts(run)

    rep = _live_parser(sub, "replay", "replay a JSONL trace against a live endpoint in wall-clock time")
    _add_workload_opts(rep)
    _add_output_opts(rep)

    r = sub.add_parser("report", help="table and PNG plots of a saved result")
    r.add_argument("file")
    r.add_argument("--plot", help="PNG path (default: FILE with .png)")
    r.add_argument("--baseline", help="add a mean-JCT speedup column against this result name")

    from loadgen.sim_cli import add_sim_commands

    add_sim_commands(sub, _add_workload_opts, _add_output_opts)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pythia-loadgen` console script."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command in ("run", "replay"):
            if args.command == "replay" and not args.trace:
                raise SystemExit("pythia-loadgen replay: --trace is required")
            return cmd_live(args, args.command)
        if args.command == "report":
            return cmd_report(args)
        from loadgen.sim_cli import run_sim_command

        return run_sim_command(args, build_workflows, _finish, _workload_config, _slo)
    except (TraceError, TemplateError, ValueError, KeyError) as e:
        print(f"pythia-loadgen: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
