"""A recording TCP relay: sits between the gateway and a replica and keeps every byte the replica sent.

Runs its own event loop in a thread, so processes that talk through it (the gateway) work while
the test itself blocks or awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.conftest import free_port


class TcpTap:
    """Relays 127.0.0.1:port -> upstream_port; `responses()` are the raw bytes of each connection's replies."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list[bytearray] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="tcp-tap", daemon=True)

    def __enter__(self) -> TcpTap:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("tap did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def connections(self) -> list[bytes]:
        """Bytes the upstream sent on each connection so far, in connection order."""
        with self._lock:
            return [bytes(c) for c in self._conns]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        record = bytearray()
        with self._lock:
            self._conns.append(record)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bytearray | None) -> None:
            try:
                while data := await r.read(65536):
                    if keep is not None:
                        with self._lock:
                            keep.extend(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.close()

        await asyncio.gather(pipe(client_r, up_w, None), pipe(up_r, client_w, record))


def split_http_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """(header block, decoded body) of each HTTP/1.1 response in one connection's byte stream."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        head = data[pos:end]
        pos = end + 4
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        }
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = bytearray()
            while True:
                line_end = data.index(b"\r\n", pos)
                size = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    pos = data.index(b"\r\n", pos) + 2  # no trailers from vLLM
                    break
                body.extend(data[pos : pos + size])
                pos += size + 2
            out.append((head, bytes(body)))
        else:
            n = int(headers.get(b"content-length", b"0"))
            out.append((head, data[pos : pos + n]))
            pos += n
    return out
