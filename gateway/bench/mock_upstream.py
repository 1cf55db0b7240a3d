"""A fast mock OpenAI server on a raw asyncio protocol, so the upstream is never the bottleneck.

HTTP/1.1 with keep-alive; non-stream completions answer a fixed JSON body, streamed ones
a few SSE chunks with chunked transfer encoding (as vLLM's uvicorn does). It also serves
/health, /v1/models and /metrics; `--no-model-info` hides the model-info routes so
sglang-router does not try to fetch a tokenizer from a hub.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

import orjson
import uvloop

MODEL = "mock-model"

_COMPLETION = orjson.dumps(
    {
        "id": "cmpl-mock",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello from the mock upstream."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 550, "completion_tokens": 7, "total_tokens": 557},
    }
)


def _sse_chunk(delta: dict[str, str], finish: str | None) -> bytes:
    event = {
        "id": "cmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


_STREAM_EVENTS = [
    _sse_chunk({"role": "assistant", "content": ""}, None),
    *(_sse_chunk({"content": w}, None) for w in ("Hello ", "from ", "the ", "mock.")),
    _sse_chunk({}, "stop"),
    b"data: "
    + orjson.dumps(
        {"id": "cmpl-mock", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL, "choices": [],
         "usage": {"prompt_tokens": 550, "completion_tokens": 5, "total_tokens": 555}}
    )
    + b"\n\n",
    b"data: [DONE]\n\n",
]


def _chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )


_STREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n" + _chunked(_STREAM_EVENTS)
)
_JSON_RESPONSE = _response("200 OK", _COMPLETION)
_HEALTH = _response("200 OK", b"")
_MODELS = _response(
    "200 OK", orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock", "max_model_len": 32768}]})
)
_METRICS = _response(
    "200 OK",
    b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"mock-model\"} 0.0\n"
    b"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"mock-model\"} 0.0\n"
    b"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name=\"mock-model\"} 0.0\n",
    b"text/plain; version=0.0.4",
)
_NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found","type":"not_found_error","code":404}}')
_STREAM_MARK = b'"stream":true'
_HOLD_MARK = b'"mock_hold_s":'
_STREAM_MARK_SPACED = b'"stream": true'


_STREAM_HEAD = _STREAM_RESPONSE[: _STREAM_RESPONSE.find(b"\r\n\r\n") + 4]


class MockProtocol(asyncio.Protocol):
    """One keep-alive connection: parse requests by Content-Length, answer from prebuilt bytes."""

    __slots__ = ("_buf", "_model_info", "_transport")

    def __init__(self, model_info: bool) -> None:
        self._buf = b""
        self._model_info = model_info
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is no asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"content-length:")
            if i >= 0:
                j = lower.find(b"\r\n", i)
                length = int(lower[i + 15 : j if j >= 0 else len(lower)].strip())
            total = end + 4 + length
            if len(buf) < total:
                break
            body = buf[end + 4 : total]
            out.append(self._answer(head, body))
            buf = buf[total:]
        self._buf = buf
        if out and self._transport is not None:
            self._transport.write(b"".join(out))

    def _hold(self, seconds: float) -> bytes:
        """Open a stream now, finish it `seconds` later: for holding many idle streams open."""
        first = _chunked(_STREAM_EVENTS[:1])[: -len(b"0\r\n\r\n")]
        rest = _chunked(_STREAM_EVENTS[1:])

        def finish() -> None:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(rest)

        asyncio.get_running_loop().call_later(seconds, finish)
        return _STREAM_HEAD + first

    def _answer(self, head: bytes, body: bytes) -> bytes:
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        parts = line.split(b" ")
        method, path = parts[0], parts[1] if len(parts) > 1 else b"/"
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions", b"/generate"):
            hold = body.find(_HOLD_MARK)
            if hold >= 0:
                return self._hold(float(body[hold + len(_HOLD_MARK) :].split(b",")[0].split(b"}")[0]))
            if _STREAM_MARK in body or _STREAM_MARK_SPACED in body:
                return _STREAM_RESPONSE
            return _JSON_RESPONSE
        if path == b"/health" or path == b"/health_generate":
            return _HEALTH
        if path == b"/metrics":
            return _METRICS
        if self._model_info and path in (b"/v1/models", b"/get_model_info", b"/model_info", b"/get_server_info"):
            return _MODELS
        return _NOT_FOUND


async def serve(host: str, port: int, model_info: bool) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: MockProtocol(model_info), host, port, reuse_port=True, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--no-model-info", action="store_true", help="404 on /v1/models and model-info routes")
    p.add_argument("--processes", type=int, default=1, help="fork this many processes sharing the port")
    a = p.parse_args(argv)
    for _ in range(a.processes - 1):
        if os.fork() == 0:
            break
    uvloop.run(serve(a.host, a.port, not a.no_model_info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
