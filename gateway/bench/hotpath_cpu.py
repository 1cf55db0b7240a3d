"""CPU per request of the gateway's Python hot path alone, with no sockets: the number to optimise against.

A `FastProtocol` client connection and the upstream pool's connections get in-memory transports;
the upstream answers each request (on the next loop iteration) with the benchmark mock's bytes.
So everything `pythia serve` runs in Python per call is measured (framing, tags, features,
prediction, routing, upstream client, relay, observe, metrics), and none of the kernel's socket
work, which a shared 2-core machine makes noisy. `--stages` also times each step of the request
on its own. Usage: `python -m gateway.bench.hotpath_cpu [--policy pythia] [--requests 20000]`.

`--handler task` runs every call in a task, as the gateway does when a middleware or rate limit is
installed (no `gateway.exchange`); `--handler minimal` swaps the gateway's handler for one that only
forwards, in a task (read the body, POST it to one replica over the same upstream pool, return the
answer): what the proxy's skeleton costs (framing, the request's task, the upstream client, the
write) without tags, features, prediction, routing, learning or metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import uvloop

from gateway.app import GATEWAY_KEY, build_app
from gateway.bench.mock_upstream import _JSON_RESPONSE, _STREAM_RESPONSE, MODEL
from gateway.bench.wrk_body import chat_body
from gateway.fastpath import FastProtocol, FastServer
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings
from gateway.upstream import ReplicaPool, _Conn, request_head
from pools.types import PoolConfig

REPLICAS = ("http://127.0.0.1:9", "http://127.0.0.1:10")


class _MemTransport:
    """Enough of an asyncio transport for both sides of the proxy: writes go to a callback."""

    def __init__(self, on_write: Callable[[bytes], None]) -> None:
        self.on_write = on_write

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, parts: Any) -> None:
        self.on_write(b"".join(parts))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...

    def set_protocol(self, proto: Any) -> None: ...


def _request(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


_JSON = b"Content-Type: application/json\r\n"


def _minimal_handler(gw: Any) -> Callable[[Any], Any]:
    """Forward the body to the first replica and return its answer: the proxy's skeleton, no gateway logic."""
    replica = next(iter(gw.replicas.values()))

    async def handle(req: Any) -> Any:
        raw = await req.read()
        pool = gw._pool_for(replica)
        head = request_head(b"POST", req.raw_path.encode(), pool.host_header, len(raw), _JSON)
        resp = await pool.request(head, raw, 60.0)
        data = await resp.read_all()
        resp.close()
        return req.raw_response(resp.status, _JSON, data)

    return handle


async def run(
    policy: str, n: int, stream: bool, batches: int = 1, prewarm: bool = False, handler: str = "gateway"
) -> list[float]:
    """Drive `batches` x `n` keep-alive requests through one connection (one gateway); CPU µs per request of each batch."""
    loop = asyncio.get_running_loop()
    answer = _STREAM_RESPONSE if stream else _JSON_RESPONSE
    pools = [PoolConfig("short", 32768, (MODEL,), REPLICAS)]
    settings = Settings.model_validate({"policy": policy, "prewarm": prewarm})
    app = build_app(settings, pools, metrics=GatewayMetrics())
    gw = app[GATEWAY_KEY]

    async def connect(self: ReplicaPool) -> _Conn:
        conn = _Conn(self)
        conn.connection_made(_MemTransport(lambda data: loop.call_soon(conn.data_received, answer)))  # type: ignore[arg-type]
        return conn

    ReplicaPool._connect = connect  # type: ignore[method-assign]
    server = FastServer(app, lambda: None, 1 << 20)  # type: ignore[arg-type,return-value]
    server.resolve_handlers()
    if handler != "gateway":
        server.starts.clear()  # every request through its task, as with middlewares or a rate limit
    if handler == "minimal":
        for path in server.handlers:
            server.handlers[path] = _minimal_handler(gw)
    req = _request(chat_body(stream))
    done = loop.create_future()
    left = [n]
    proto = FastProtocol(server)

    def got(data: bytes) -> None:
        # a non-stream answer is one write; a stream's last write ends with the chunked terminator
        if stream and not data.endswith(b"0\r\n\r\n"):
            return
        left[0] -= 1
        if left[0] <= 0:
            if not done.done():
                done.set_result(None)
        else:
            loop.call_soon(proto.data_received, req)

    proto.connection_made(_MemTransport(got))  # type: ignore[arg-type]
    warm = min(2000, n)
    left[0] = warm
    proto.data_received(req)
    await done
    out = []
    for _ in range(batches):  # several batches show whether the cost drifts as the gateway's state grows
        done = loop.create_future()
        left[0] = n
        t0 = time.thread_time_ns()
        proto.data_received(req)
        await done
        out.append((time.thread_time_ns() - t0) / n / 1e3)
    await gw.predictor.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--policy", default="pythia")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="fresh gateways, one after the other")
    p.add_argument("--batches", type=int, default=1, help="consecutive batches of --requests in each gateway")
    p.add_argument("--handler", choices=("gateway", "task", "minimal"), default="gateway",
                   help="task: the gateway with every call in a task (no exchange); minimal: forward only, in a task")
    a = p.parse_args(argv)
    if a.handler == "minimal" and a.stream:
        p.error("--handler minimal forwards non-streamed answers only")
    out = [x for _ in range(a.repeat) for x in uvloop.run(run(a.policy, a.requests, a.stream, a.batches, handler=a.handler))]
    from pools.build_info import loaded_build

    print(orjson.dumps({"policy": a.policy, "stream": a.stream, "handler": a.handler, "build": loaded_build(),
                        "cpu_us_per_req": [round(x, 1) for x in out]}).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
