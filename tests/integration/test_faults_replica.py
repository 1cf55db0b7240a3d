"""A simulated vLLM replica SIGKILLed under load, then restarted on the same port: what clients see.

Two `pythia sim-engine` replicas behind a two-worker gateway; streams run on both when one is killed.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from tests.conftest import VENV_BIN, Proc, ProcessGroup, free_port
from tests.integration.conftest import start_gateway

MODEL = "llama-3.1-8b"


def start_engine(group: ProcessGroup, name: str, port: int | None = None) -> Proc:
    port = port or free_port()
    return group.start(
        [str(VENV_BIN / "pythia"), "sim-engine", "--host", "127.0.0.1", "--port", str(port),
         "--preset", "llama-3.1-8b-a100", "--seed", str(port)],
        name=name, url=f"http://127.0.0.1:{port}", ready_path="/health",
    )  # fmt: skip


def body(i: int, stream: bool, max_tokens: int) -> bytes:
    return orjson.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": f"question {i} " * 20}],
        "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
    })  # fmt: skip


class Call:
    """One request's outcome: status, replica that served it, whole body, and whether bytes had arrived."""

    def __init__(self) -> None:
        self.status = 0
        self.replica = ""
        self.body = b""
        self.started = asyncio.Event()  # first body bytes reached the client


async def run_call(s: aiohttp.ClientSession, url: str, data: bytes, call: Call) -> None:
    async with s.post(
        url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
    ) as r:
        call.status = r.status
        call.replica = r.headers.get("x-pythia-replica", "")
        async for chunk in r.content.iter_any():
            call.body += chunk
            call.started.set()
    call.started.set()


async def test_sigkilled_replica_under_load(procs: ProcessGroup) -> None:
    a, b = start_engine(procs, "sim-a"), start_engine(procs, "sim-b")
    pools = [{"name": "p", "max_context_tokens": 16384, "models": [MODEL], "replicas": [a.url, b.url]}]
    gw = start_gateway(
        procs, pools, workers=2, routing_headers=True, health_interval_s=0.2, policy="round_robin"
    )
    b_port = int(b.url.rsplit(":", 1)[1])
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        streams = [Call() for _ in range(12)]
        tasks = [
            asyncio.create_task(run_call(s, gw.url, body(i, True, 500), c)) for i, c in enumerate(streams)
        ]
        await asyncio.wait_for(asyncio.gather(*(c.started.wait() for c in streams)), 30)
        on_b = [c for c in streams if c.replica == b.url]
        assert on_b and len(on_b) < len(streams)  # both replicas are streaming
        b.kill()  # SIGKILL mid-stream
        # calls arriving now: connect refused on b is retried on a, before any byte reached the client
        after = [Call() for _ in range(12)]
        tasks += [
            asyncio.create_task(run_call(s, gw.url, body(100 + i, False, 8), c)) for i, c in enumerate(after)
        ]
        await asyncio.wait_for(asyncio.gather(*tasks), 60)  # nothing hangs
        assert all(c.status == 200 and c.replica == a.url for c in after), [
            (c.status, c.replica) for c in after
        ]
        for c in streams:
            assert c.status == 200 and c.body.endswith(b"data: [DONE]\n\n"), c.body[-300:]
            events = [e for e in c.body.split(b"\n\n") if e.startswith(b"data: {")]
            errors = [orjson.loads(e[6:])["error"] for e in events if b'"error"' in e]
            if c.replica == b.url:  # broke mid-stream: ends with one clean OpenAI error event
                assert len(errors) == 1 and errors[0]["code"] == "upstream_disconnect", c.body[-300:]
                assert orjson.loads(events[-1][6:]) == {"error": errors[0]}
            else:  # the survivor's streams are untouched
                assert not errors and b'"finish_reason":"length"' in c.body
        # restarted on the same port: readmitted once its /health passes
        start_engine(procs, "sim-b2", port=b_port)
        seen: set[str] = set()
        deadline = time.monotonic() + 15
        while b.url not in seen and time.monotonic() < deadline:
            c = Call()
            await run_call(s, gw.url, body(0, False, 4), c)
            assert c.status == 200
            seen.add(c.replica)
        assert b.url in seen
        healthy = f'pythia_replica_healthy{{pool="p",replica="{b.url}"}} 1.0'
        deadline = time.monotonic() + 10  # every worker readmits it (metrics merge both workers' views)
        while time.monotonic() < deadline:
            async with s.get(gw.url + "/metrics") as r:
                if healthy in await r.text():
                    break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("replica not readmitted by every worker")
