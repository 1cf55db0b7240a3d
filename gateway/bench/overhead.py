"""`make bench-gateway`: gateway overhead side by side with nginx and the Rust routers, same load, one run.

Every target proxies to the same fast mock upstreams (gateway.bench.mock_upstream); wrk
drives a 2,205-byte chat body at 64 connections for non-stream and stream, then one
connection for added latency. A second phase holds 10,000 open SSE streams through
`pythia serve` and records its memory. Results go to docs/results/gateway-overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.bench.wrk_body import MODEL, chat_body, lua_script

ROUTER_VENV = Path(".venv-bench")
TARGETS = [
    "direct",
    "nginx",
    # the least a Python proxy can do per request (gateway.bench.floor_proxy): what CPython + uvloop cost
    "python-floor",
    "vllm-router:round_robin",
    "vllm-router:cache_aware",
    "sglang-router:round_robin",
    "sglang-router:cache_aware",
    "pythia:round_robin",
    "pythia:pythia",
    "pythia-aiohttp:round_robin",  # PYTHIA_FAST_PATH=0: what the fast server path saves, in the same run
    # the same gateway from the opt-in compiled build (`make compiled`: mypyc, its own venv)
    "pythia-compiled:round_robin",
    "pythia-compiled:pythia",
]
COMPILED_VENV = Path(".venv-compiled")


def group_cpu_s(pgids: list[int]) -> float:
    """User + system CPU seconds of every live process in these process groups (all their threads)."""
    user, system = group_cpu_split_s(pgids)
    return user + system


def group_cpu_split_s(pgids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of every live process in these process groups: system is the kernel's
    share (socket syscalls, loopback TCP), user the process's own code (for Python: the interpreter)."""
    want = set(pgids)
    user = system = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(f[2]) in want:
                user += int(f[11])
                system += int(f[12])
        except (OSError, ValueError, IndexError):
            continue
    tck = os.sysconf("SC_CLK_TCK")
    return user / tck, system / tck


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    """Poll until `url` answers anything below 500."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up: {last}")


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


_LIVE: list[Procs] = []  # every Procs with processes, stopped by _stop_all on SIGTERM/SIGINT


def _stop_all(signum: int, frame: object) -> None:
    """Stop everything this run started, then exit (a killed harness must not leave servers behind)."""
    for procs in list(_LIVE):
        procs.stop()
    raise SystemExit(128 + signum)


@dataclass(slots=True)
class Procs:
    """Processes started for one target; all are killed (process group) on exit."""

    items: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.items.append(p)
        if self not in _LIVE:
            _LIVE.append(self)
        return p

    @property
    def pgids(self) -> list[int]:
        return [p.pid for p in self.items]  # each started in its own session: pgid == pid

    def stop(self) -> None:
        for p in self.items:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.items:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.items.clear()
        if self in _LIVE:
            _LIVE.remove(self)


def ensure_tools() -> None:
    """wrk and nginx from Debian, the routers from PyPI into their own venv."""
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not (ROUTER_VENV / "bin" / "vllm-router").exists() or not (ROUTER_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(ROUTER_VENV)], check=True)
        subprocess.run([str(ROUTER_VENV / "bin" / "pip"), "install", "-q", "vllm-router", "sglang-router"], check=True)


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


NGINX_CONF = """
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream backends {{ {servers} keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    client_max_body_size 10m;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      tcp_nodelay on;
    }}
  }}
}}
"""


def rust_router_command(kind: str, policy: str, port: int, upstreams: list[str]) -> tuple[list[str], dict[str, str]]:
    """Command line and extra environment of `vllm-router` or `sglang-router` (from `.venv-bench`) on loopback."""
    if kind == "vllm-router":
        return [str(ROUTER_VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), "--log-level", "warning",
                "--worker-urls", *upstreams], {}
    if kind == "sglang-router":
        # offline: no tokenizer to fetch for the model name, so its cache-aware tree works on the request text
        return [str(ROUTER_VENV / "bin" / "python"), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(port), "--policy", policy, "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(free_port()), "--log-level", "warn", "--worker-urls", *upstreams], \
            {"HF_HUB_OFFLINE": "1"}
    raise ValueError(f"unknown router {kind!r}")


@contextlib.contextmanager
def target(name: str, upstreams: list[str], tmp: Path) -> Iterator[tuple[str, list[int]]]:
    """Start one target in front of `upstreams`; yield its base URL and process groups (for CPU accounting)."""
    procs = Procs()
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        kind, _, policy = name.partition(":")
        if kind == "direct":
            yield upstreams[0], []
            return
        if kind == "nginx":
            d = tmp / "nginx"
            d.mkdir(exist_ok=True)
            servers = " ".join(f"server {u.removeprefix('http://')};" for u in upstreams)
            (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, servers=servers, port=port))
            procs.start([nginx_bin(), "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"], log=tmp / "nginx.log")
            wait_http(base + "/health")
        elif kind == "python-floor":
            procs.start([sys.executable, "-m", "gateway.bench.floor_proxy", "--port", str(port), "--processes", "2",
                         *(x for u in upstreams for x in ("--upstream", u))], log=tmp / "python-floor.log")
            wait_port(port)
        elif kind in ("vllm-router", "sglang-router"):
            cmd, env = rust_router_command(kind, policy, port, upstreams)
            procs.start(cmd, env=env, log=tmp / f"{kind}-{policy}.log")
            wait_http(base + "/health")
        elif kind in ("pythia", "pythia-aiohttp", "pythia-compiled"):
            pools = [{"name": "short", "max_context_tokens": 32768, "models": [MODEL], "replicas": upstreams}]
            # the compiled build's console script (its sys.path starts at its own bin/, not the repo);
            # PYTHIA_EXPECT_BUILD makes `pythia serve` refuse to start if another build would be loaded
            bin_dir = COMPILED_VENV / "bin" if kind == "pythia-compiled" else Path(sys.executable).parent
            if not (bin_dir / "pythia").exists():
                raise FileNotFoundError(f"{bin_dir / 'pythia'} (run `make compiled`)")
            procs.start(
                [str(bin_dir / "pythia"), "serve"],
                env={"PYTHIA_HOST": "127.0.0.1", "PYTHIA_PORT": str(port), "PYTHIA_WORKERS": "2",
                     "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_POLICY": policy, "PYTHIA_LOG_LEVEL": "warning",
                     "PYTHIA_FAST_PATH": "0" if kind == "pythia-aiohttp" else "1",
                     "PYTHIA_EXPECT_BUILD": "compiled" if kind == "pythia-compiled" else "interpreted"},
                log=tmp / f"{kind}-{policy}.log",
            )
            wait_http(base + "/ready")
        else:
            raise ValueError(name)
        yield base, procs.pgids
    finally:
        procs.stop()


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, script: Path, connections: int, seconds: int, pgids: list[int] | None = None) -> dict[str, float]:
    """One wrk run; returns rps, p50_ms, p99_ms, the error count and the target's CPU microseconds per request."""
    cpu0 = group_cpu_split_s(pgids) if pgids else (0.0, 0.0)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(script),
         url + "/v1/chat/completions"],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # anchored to the "Latency Distribution" lines: a "+/- Stdev" column such as "75.50%" must not match
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_err = (int(errs.group(1)) if errs else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    res: dict[str, float] = {"rps": round(rps, 1), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "errors": n_err}
    n = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if pgids and n:
        # CPU per request is what a crowded machine distorts least: rps follows the share of cores a target gets
        user, system = group_cpu_split_s(pgids)
        res["cpu_us_per_req"] = round((user + system - cpu0[0] - cpu0[1]) / n * 1e6, 1)
        res["cpu_user_us_per_req"] = round((user - cpu0[0]) / n * 1e6, 1)
        res["cpu_sys_us_per_req"] = round((system - cpu0[1]) / n * 1e6, 1)
    return res


SENDS = "socket writes (send syscalls)"
_WRITE_LINES = ("_Conn.send (", "_write_response (", "_write_raw (", "FastStreamResponse._send (", "_writelines (")


def _category(frames: list[str]) -> str:
    """Where one py-spy sample's time went (frames root first)."""
    leaf = frames[-1]
    joined = ";".join(frames)
    if any(w in leaf for w in _WRITE_LINES):
        return SENDS
    for marker, name in (
        ("predictor/", "predictor (predict + observe)"),
        ("pools/request_features.py", "request features (tokens, prefix hashes, fingerprints)"),
        ("pools/prefix_hash.py", "request features (tokens, prefix hashes, fingerprints)"),
        ("gateway/features.py", "request features (tokens, prefix hashes, fingerprints)"),
        ("gateway/autoscale.py", "pythia mechanisms (autoscale, admission, pre-warm)"),
        ("gateway/admission.py", "pythia mechanisms (autoscale, admission, pre-warm)"),
        ("pools/", "routing core (pools/routing, prefix index)"),
        ("prometheus_client/", "metrics"),
        ("gateway/metrics.py", "metrics"),
        ("gateway/autoscale.py", "pythia mechanisms (autoscale, admission, pre-warm)"),
        ("gateway/admission.py", "pythia mechanisms (autoscale, admission, pre-warm)"),
        ("gateway/prewarm.py", "pythia mechanisms (autoscale, admission, pre-warm)"),
    ):
        if marker in joined:
            return name
    if "aiohttp/" in leaf:
        return "aiohttp"
    if "gateway/fastpath.py" in leaf:
        return "server framing (gateway/fastpath.py)"
    if "gateway/upstream.py" in leaf:
        return "upstream client (gateway/upstream.py)"
    if "gateway/" in leaf:
        return "proxy logic (gateway/*.py)"
    if leaf.startswith("Runner.run") or "uvloop" in leaf:
        return "event loop in C (uvloop: epoll, socket reads, callbacks)"
    return "other Python"


def profile_worker(url: str, script: Path, pgids: list[int], seconds: int, tmp: Path) -> dict[str, object]:
    """py-spy one gateway worker under the non-stream load: share of samples by category and top frames."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    workers = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(int(d.name)) in pgids]
    if not workers:
        return {"error": "no worker process found"}
    raw = tmp / "profile.txt"
    # A CPU profile: py-spy's default mode drops idle samples (a thread waiting in epoll), so the shares
    # are of the worker's busy time. Time inside a send syscall (loopback TCP runs in the sender) stays in.
    spy_proc = subprocess.Popen(
        [spy, "record", "-p", str(workers[0]), "-d", str(seconds), "-r", "200", "-f", "raw", "-o", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    w_user0, w_sys0 = _proc_cpu_s(workers[0])
    run_wrk(url, script, 64, seconds + 1)
    w_user1, w_sys1 = _proc_cpu_s(workers[0])
    try:
        spy_proc.wait(30)
    except subprocess.TimeoutExpired:
        spy_proc.kill()
        return {"error": "py-spy did not finish"}
    cats: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        frames = stack.split(";")
        total += n
        c = _category(frames)
        cats[c] = cats.get(c, 0) + n
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + n
    if not total:
        return {"error": "no samples"}
    sends = cats.pop(SENDS, 0)
    busy = max(1, total - sends)
    pct = lambda n: round(100.0 * n / busy, 1)  # noqa: E731
    w_user, w_sys = w_user1 - w_user0, w_sys1 - w_sys0
    return {
        "target": "pythia:pythia, one worker, non-stream, 64 connections",
        "samples": total,
        # py-spy counts a thread inside a syscall as busy: after a loopback send wakes its peer on a 2-core box
        # the sender mostly waits for a core there, which is not its CPU (see worker_cpu_system_pct)
        "in_send_syscalls_pct_of_samples": round(100.0 * sends / total, 1),
        "by_category_pct": {k: pct(v) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_self_pct": _top(leaves, pct),
        # the worker's CPU in the kernel (system: socket syscalls, loopback TCP) vs in Python (user)
        "worker_cpu_system_pct": round(100.0 * w_sys / max(1e-9, w_user + w_sys), 1),
    }


def _top(leaves: dict[str, int], pct: Callable[[int], float], n: int = 15) -> dict[str, float]:
    """The `n` frames with the most self samples, sends left out (their share is reported apart)."""
    items = [(k, v) for k, v in sorted(leaves.items(), key=lambda kv: -kv[1]) if not any(w in k for w in _WRITE_LINES)]
    return {k: pct(v) for k, v in items[:n]}


def _proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    try:
        f = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(f[11]) / tck, int(f[12]) / tck
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0


def _ppid(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def measure(targets: list[str], seconds: int, warmup: int, tmp: Path, profile: bool = False) -> dict[str, dict[str, object]]:
    """The side-by-side table: non-stream, stream and one-connection latency per target."""
    ns, st = tmp / "nonstream.lua", tmp / "stream.lua"
    ns.write_text(lua_script(chat_body(False)))
    st.write_text(lua_script(chat_body(True)))
    result: dict[str, dict[str, object]] = {"non_stream": {}, "stream": {}, "added_latency_c1_ms": {}, "c1_p50_ms": {}}
    mocks = Procs()
    try:
        ups: list[str] = []
        ups_noinfo: list[str] = []
        for info in (True, False):
            for _ in range(2):
                port = free_port()
                cmd = [sys.executable, "-m", "gateway.bench.mock_upstream", "--port", str(port)]
                mocks.start(cmd + ([] if info else ["--no-model-info"]))
                (ups if info else ups_noinfo).append(f"http://127.0.0.1:{port}")
        for u in ups + ups_noinfo:
            wait_http(u + "/health")
        for name in targets:
            upstreams = ups_noinfo if name.startswith("sglang") else ups
            print(f"== {name}", flush=True)
            try:
                with target(name, upstreams, tmp) as (url, pgids):
                    run_wrk(url, ns, 64, warmup)
                    result["non_stream"][name] = run_wrk(url, ns, 64, seconds, pgids)
                    run_wrk(url, st, 64, warmup)
                    result["stream"][name] = run_wrk(url, st, 64, seconds, pgids)
                    result["c1_p50_ms"][name] = run_wrk(url, ns, 1, max(3, seconds // 3))["p50_ms"]
                    if profile and name == "pythia:pythia":
                        result["profile"] = profile_worker(url, ns, pgids, min(seconds, 10), tmp)
            except Exception as e:  # one broken target must not sink the table
                print(f"   {name} failed: {e}", flush=True)
                result["non_stream"][name] = result["stream"][name] = {"error": str(e)}
            print(f"   non_stream {result['non_stream'][name]}  stream {result['stream'][name]}", flush=True)
    finally:
        mocks.stop()
    direct = result["c1_p50_ms"].get("direct")
    if isinstance(direct, float):
        for name, v in result["c1_p50_ms"].items():
            if isinstance(v, float):
                result["added_latency_c1_ms"][name] = round(v - direct, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="docs/results/gateway-overhead.json")
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--streams", type=int, default=10000, help="open SSE streams for the memory run (0 = skip)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of a pythia worker")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_all)
    signal.signal(signal.SIGINT, _stop_all)
    ensure_tools()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pythia-bench-") as d:
        result = measure(a.targets.split(","), a.seconds, a.warmup, Path(d), profile=not a.no_profile)
        load_after = os.getloadavg()
        if a.streams:
            from gateway.bench.open_streams import measure_open_streams

            result["open_streams"] = measure_open_streams(a.streams, Path(d))
    result["config"] = {
        "command": "make bench-gateway",
        "seconds": a.seconds,
        "connections": 64,
        "body_bytes": len(chat_body(False)),
        "machine": f"{os.cpu_count()} cores",
        "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
        "load_avg_1_5_15_after": [round(x, 2) for x in load_after],
        "pythia_workers": 2,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
