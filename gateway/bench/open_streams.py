"""Hold many SSE streams open through `pythia serve` at once and record the gateway's memory."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

import orjson
import uvloop

from gateway.bench.overhead import Procs, free_port, wait_http
from gateway.bench.wrk_body import MODEL

# round_robin: every stream is proxied at once. (`pythia` would rightly queue calls past the one mock
# replica's KV-bounded concurrency in its admission queue, which holds no upstream stream open.)
POLICY = "round_robin"


def _raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the gateway and its workers)."""
    total_kb = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total_kb / 1024


async def _hold_streams(
    url: str, n: int, hold_s: float, on_all_open: asyncio.Future[None], failures: dict[str, int], open_s: float = 45.0
) -> tuple[int, int]:
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hold"}], "stream": True, "mock_hold_s": hold_s}
    )
    req = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    opened = 0
    done_ok = 0
    all_open = asyncio.Event()

    async def one() -> None:
        nonlocal opened, done_ok
        for attempt in range(5):  # a crowded accept backlog drops some SYNs: try again, as clients do
            try:
                r, w = await asyncio.open_connection(host, int(port))
                break
            except OSError:
                if attempt == 4:
                    failures["connect failed"] = failures.get("connect failed", 0) + 1
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
        try:
            w.write(req)
            data = b""
            while b"data:" not in data:
                chunk = await r.read(4096)
                if not chunk:
                    failures["closed before the first event"] = failures.get("closed before the first event", 0) + 1
                    return
                data += chunk
                if data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 200") and b"\r\n" in data:
                    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                    failures[line] = failures.get(line, 0) + 1
                    return
            opened += 1
            if opened == n:
                all_open.set()
            while b"[DONE]" not in data:
                chunk = await r.read(4096)
                if not chunk:
                    return
                data = data[-16:] + chunk
            done_ok += 1
        finally:
            w.close()

    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(one()))
        if len(tasks) % 500 == 0:
            await asyncio.sleep(0.05)  # don't overflow the accept backlog
    try:
        await asyncio.wait_for(all_open.wait(), timeout=open_s)
        on_all_open.set_result(None)
    except TimeoutError:
        on_all_open.set_exception(RuntimeError(f"only {opened} of {n} streams opened within {open_s:.0f} s"))
    # every stream ends hold_s after it opened; a stuck one must not hang the run (or leave servers behind)
    _, pending = await asyncio.wait(tasks, timeout=hold_s + 30.0)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return opened, done_ok


def measure_open_streams(n: int, tmp: Path, hold_s: float = 60.0) -> dict[str, object]:
    """Open `n` streams through a 2-worker gateway; report RSS while all are open and how many completed."""
    _raise_fd_limit(4 * n + 1024)
    procs = Procs()
    try:
        up_port, gw_port = free_port(), free_port()
        procs.start([sys.executable, "-m", "gateway.bench.mock_upstream", "--port", str(up_port)])
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(upstream + "/health")
        pools = [{"name": "short", "max_context_tokens": 32768, "models": [MODEL], "replicas": [upstream]}]
        gw = procs.start(
            [str(Path(sys.executable).parent / "pythia"), "serve"],
            env={"PYTHIA_HOST": "127.0.0.1", "PYTHIA_PORT": str(gw_port), "PYTHIA_WORKERS": "2",
                 "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_POLICY": POLICY, "PYTHIA_LOG_LEVEL": "warning",
                 # 10,000 upstream connects at once on a crowded box can take more than the default 2 s
                 "PYTHIA_CONNECT_TIMEOUT_S": "10"},
            log=tmp / "pythia-streams.log",
        )
        base = f"http://127.0.0.1:{gw_port}"
        wait_http(base + "/ready")
        idle_rss = _group_rss_mb(os.getpgid(gw.pid))

        async def run() -> dict[str, object]:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failures: dict[str, int] = {}
            task = asyncio.create_task(_hold_streams(base, n, hold_s, fut, failures))
            t0 = time.monotonic()
            peak = 0.0
            try:
                await fut
                open_after = time.monotonic() - t0
                peak = _group_rss_mb(os.getpgid(gw.pid))
            except RuntimeError as e:
                open_after = -1.0
                peak = _group_rss_mb(os.getpgid(gw.pid))  # still worth knowing with most streams open
                print(e, flush=True)
            opened, completed = await task
            return {"streams": n, "policy": POLICY, "opened": opened, "completed": completed, "failures": failures, "seconds_to_open_all": round(open_after, 2),
                    "gateway_rss_idle_mb": round(idle_rss, 1), "gateway_rss_all_open_mb": round(peak, 1)}

        res = uvloop.run(run())
        print(f"open streams: {res}", flush=True)
        return res
    finally:
        procs.stop()
