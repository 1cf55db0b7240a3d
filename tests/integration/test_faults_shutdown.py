"""Gateway SIGTERM while streams run: new connections are refused at once, the running streams finish,
exit status 0. (tests/integration/test_gateway_failover.py checks the stream and exit status alone.)"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson

from tests.conftest import ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"


async def test_sigterm_stops_accepting_while_streams_finish(procs: ProcessGroup) -> None:
    up = start_fake_upstream(procs, "a", MODEL)
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(procs, pools, workers=2, shutdown_grace_s=15)
    data = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
                         "fake": {"chunks": 15, "delay_s": 0.1}})  # fmt: skip
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        responses = [await s.post(gw.url + "/v1/chat/completions", data=data) for _ in range(4)]
        firsts = [await r.content.readany() for r in responses]
        gw.signal(signal.SIGTERM)
        t0 = time.monotonic()
        refused = False
        while time.monotonic() - t0 < 5.0 and not refused:  # both workers close their listening sockets
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(gw.url + "/health") as r:
                    await r.read()
            except aiohttp.ClientConnectionError:
                refused = True
            await asyncio.sleep(0.05)
        assert refused, "still accepting new connections after SIGTERM"
        bodies = [f + await r.read() for f, r in zip(firsts, responses, strict=True)]
    for b in bodies:
        assert b.endswith(b"data: [DONE]\n\n") and b.count(b"data: ") == 16, b[-200:]
    assert await asyncio.to_thread(gw.popen.wait, 20) == 0, gw.log_text()[-3000:]
