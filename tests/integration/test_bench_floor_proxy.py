"""The overhead benchmark's Python floor (`gateway.bench.floor_proxy`) relays the mock's bytes exactly,
over keep-alive, so its CPU per request measures relaying and nothing less."""

from __future__ import annotations

import socket
import sys

from gateway.bench.overhead import wait_port
from gateway.bench.wrk_body import chat_body
from tests.conftest import ProcessGroup, free_port


def _request(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def _exchange(port: int, requests: list[bytes], ends: list[bytes]) -> list[bytes]:
    """Send each request on one connection, reading its answer until `ends[i]` closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        out = []
        for req, end in zip(requests, ends, strict=True):
            s.sendall(req)
            got = b""
            while not got.endswith(end):
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {got[-200:]!r}"
                got += chunk
            out.append(got)
        return out


def test_floor_proxy_relays_json_and_sse_answers_byte_for_byte_over_keep_alive(procs: ProcessGroup) -> None:
    ups = []
    for _ in range(2):
        port = free_port()
        procs.start([sys.executable, "-m", "gateway.bench.mock_upstream", "--port", str(port)], name="mock")
        ups.append(port)
    proxy = free_port()
    procs.start([sys.executable, "-m", "gateway.bench.floor_proxy", "--port", str(proxy), "--processes", "1",
                 *(x for p in ups for x in ("--upstream", f"http://127.0.0.1:{p}"))], name="floor")
    for p in (*ups, proxy):
        wait_port(p)
    plain, stream = _request(chat_body(False)), _request(chat_body(True))
    reqs = [plain, stream, plain, stream]
    # a JSON answer ends with its body's closing brace, an SSE answer with the chunked terminator
    ends = [b"}", b"0\r\n\r\n", b"}", b"0\r\n\r\n"]
    direct = _exchange(ups[0], reqs, ends)
    assert _exchange(proxy, reqs, ends) == direct  # four answers on one client connection, both upstreams used
    assert b"content-length" in direct[0].lower() and b"data: [DONE]" in direct[1]
