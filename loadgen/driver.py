"""Open-loop HTTP driver: sends each workflow's calls at their scheduled times and records what came back.

Workflows arrive on their own schedule whatever the server does (open loop). A call is
scheduled when its dependencies complete plus its think time; every latency counts from
that scheduled time, so a slow client or server shows up as latency, never as a lower rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from loadgen.http_client import ConnectionPool, HttpFailure, Sink
from loadgen.metrics import RequestRecord, WorkflowRecord
from loadgen.workflow import Call, Workflow

DONE = b"[DONE]"


@dataclass(slots=True)
class DriverConfig:
    """How to reach the target and what to send."""

    target: str  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    tagged: bool = True  # send X-Pythia-* headers
    model: str = ""  # overrides each call's model when set
    stream: bool = True
    ignore_eos: bool = True
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 600.0  # whole request, from send to the last byte
    max_connections: int = 0  # 0 = unlimited (open loop: never queue in the client)
    api_key: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)
    drain_timeout_s: float = 600.0  # after the last arrival, how long to wait for in-flight work

    def base(self) -> str:
        b = self.target.rstrip("/")
        return b[: -len("/v1")] if b.endswith("/v1") else b


@dataclass(slots=True)
class RunRecords:
    """Everything a live run measured."""

    requests: list[RequestRecord]
    workflows: list[WorkflowRecord]
    started_wall: float  # time.time() at t=0
    duration_s: float
    cancelled: bool = False
    client_cpu_s: float = 0.0  # this process's CPU time during the run (user + system)
    connections_opened: int = 0


ProgressFn = Callable[[RequestRecord], None]


class Driver:
    """Runs a list of workflows against one target; use `await Driver(cfg).run(workflows)`."""

    def __init__(self, cfg: DriverConfig, progress: ProgressFn | None = None) -> None:
        self.cfg = cfg
        self.progress = progress
        self.requests: list[RequestRecord] = []
        self.workflows: list[WorkflowRecord] = []
        self.inflight = 0
        self._t0 = 0.0
        self._pool: ConnectionPool
        prefix = urlsplit(cfg.base()).path.rstrip("/")
        self._path_chat = f"{prefix}/v1/chat/completions"
        self._path_completions = f"{prefix}/v1/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json",
                         **cfg.extra_headers}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"

    async def run(self, workflows: Sequence[Workflow]) -> RunRecords:
        """Send every workflow at its arrival time; returns when all finished or the drain timed out."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        cancelled = False
        self._pool = ConnectionPool(self.cfg.base(), self.cfg.connect_timeout_s, self.cfg.max_connections)
        self._t0 = loop.time()
        started_wall = time.time()
        cpu0 = time.process_time()
        ordered = sorted(workflows, key=lambda w: w.arrival_s)
        try:
            for wf in ordered:
                delay = self._t0 + wf.arrival_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = WorkflowRecord(wf.workflow_id, wf.app, wf.arrival_s, calls=len(wf.calls))
                self.workflows.append(rec)
                t = loop.create_task(self._workflow(wf, rec))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                _, still = await asyncio.wait(set(tasks), timeout=self.cfg.drain_timeout_s)
                for t in still:
                    t.cancel()
                if still:
                    await asyncio.wait(still, timeout=5)
        except asyncio.CancelledError:
            cancelled = True
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(set(tasks), timeout=5)
        finally:
            self._pool.close()
        duration = loop.time() - self._t0
        return RunRecords(self.requests, self.workflows, started_wall, duration, cancelled,
                          time.process_time() - cpu0, self._pool.opened)

    async def _workflow(self, wf: Workflow, rec: WorkflowRecord) -> None:
        loop = asyncio.get_running_loop()
        start = self._t0 + wf.arrival_s
        calls = wf.calls
        if len(calls) == 1 and not calls[0].depends_on:  # the common trace case: no bookkeeping needed
            r = await self._call(calls[0], start + calls[0].think_time_s)
            rec.failed_calls += not r.ok
            rec.end_s, rec.done = r.end_s, True
            return
        end_at: list[float | None] = [None] * len(calls)
        ok: list[bool] = [False] * len(calls)
        events = [asyncio.Event() for _ in calls]

        async def one(c: Call) -> None:
            try:
                if c.depends_on:
                    for d in c.depends_on:
                        await events[d].wait()
                    if not all(ok[d] for d in c.depends_on):  # a failed step ends its branch
                        rec.failed_calls += 1
                        return
                    ready = max(end_at[d] or start for d in c.depends_on)
                else:
                    ready = start
                r = await self._call(c, ready + c.think_time_s)
                ok[c.index] = r.ok
                rec.failed_calls += not r.ok
                end_at[c.index] = self._t0 + r.end_s
                rec.end_s = max(rec.end_s, r.end_s)
            finally:
                events[c.index].set()

        await asyncio.gather(*(one(c) for c in calls))
        rec.done = True
        if rec.end_s == 0.0:
            rec.end_s = loop.time() - self._t0

    async def _call(self, call: Call, at: float) -> RequestRecord:
        loop = asyncio.get_running_loop()
        t0 = self._t0
        rec = RequestRecord(call.workflow_id, call.app, call.role, call.index, scheduled_s=at - t0,
                            prompt_tokens=call.prompt_tokens, expected_output_tokens=call.output_tokens)
        self.requests.append(rec)
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        cfg = self.cfg
        body = orjson.dumps(call.body(stream=cfg.stream, model=cfg.model or None, ignore_eos=cfg.ignore_eos))
        headers = {**self._headers, **call.tags()} if cfg.tagged else self._headers
        path = self._path_chat if call.chat else self._path_completions
        sink = _StreamSink(rec, t0) if cfg.stream else _BodySink(rec, t0)
        self.inflight += 1
        rec.sent_s = loop.time() - t0
        try:
            await self._pool.request("POST", path, headers, body, sink, cfg.request_timeout_s)
            sink.finish(loop.time() - t0)
        except HttpFailure as e:
            if not rec.error:
                rec.error = e.kind
                rec.detail = str(e)[:300]
        except asyncio.CancelledError:
            rec.error = "cancelled"
            raise
        finally:
            self.inflight -= 1
            if rec.end_s == 0.0:
                rec.end_s = loop.time() - t0
        if self.progress is not None:
            self.progress(rec)
        return rec


class _StreamSink(Sink):
    """Times SSE events per network read and reads usage from the last chunk (vLLM's include_usage)."""

    __slots__ = ("buf", "chunks", "error_body", "finished", "last", "rec", "status", "t0", "usage")

    def __init__(self, rec: RequestRecord, t0: float) -> None:
        self.rec = rec
        self.t0 = t0
        self.buf = b""
        self.chunks = 0
        self.last = 0.0
        self.usage: dict[str, Any] | None = None
        self.finished = False
        self.status = 0
        self.error_body = b""

    def headers(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status
        self.rec.status = status
        self.rec.replica = headers.get(b"x-pythia-replica", b"").decode("latin-1")

    def body(self, data: bytes, now: float) -> None:
        if self.status != 200:
            if len(self.error_body) < 4096:
                self.error_body += data
            return
        if self.finished or self.rec.error:
            return  # the rest of the body (the chunked terminator) is read but not parsed
        buf = self.buf + data if self.buf else data
        if b"\n" not in buf:
            self.buf = buf
            return
        *lines, self.buf = buf.split(b"\n")
        rec = self.rec
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == DONE:
                self.finished = True
                return
            try:
                ev = orjson.loads(payload)
            except orjson.JSONDecodeError:
                rec.error = "invalid_stream"
                return
            if "error" in ev:
                rec.error = "stream_error"
                rec.detail = str(ev["error"])[:300]
                return
            if ev.get("usage"):
                self.usage = ev["usage"]
            for ch in ev.get("choices") or ():
                delta = ch.get("delta")
                text = (delta.get("content") or delta.get("reasoning_content")) if delta else ch.get("text")
                if text:
                    t = now - self.t0
                    if rec.first_token_s is None:
                        rec.first_token_s = t
                    else:
                        rec.itl_s.append(t - self.last)
                    self.last = t
                    self.chunks += 1

    def finish(self, now: float) -> None:
        rec = self.rec
        rec.end_s = now
        if rec.error:
            return
        if self.status != 200:
            rec.error = f"http_{self.status}"
            rec.detail = _error_message(self.error_body)
            return
        if not self.finished and self.chunks == 0:
            rec.error = "empty_stream"
            return
        rec.ok = True
        _usage(rec, self.usage, self.chunks)


class _BodySink(Sink):
    """Collects a non-streamed answer; the first token counts as arriving with the last byte."""

    __slots__ = ("data", "rec", "status", "t0")

    def __init__(self, rec: RequestRecord, t0: float) -> None:
        self.rec, self.t0, self.data, self.status = rec, t0, b"", 0

    def headers(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = self.rec.status = status
        self.rec.replica = headers.get(b"x-pythia-replica", b"").decode("latin-1")

    def body(self, data: bytes, now: float) -> None:
        self.data += data

    def finish(self, now: float) -> None:
        rec = self.rec
        rec.end_s = now
        if self.status != 200:
            rec.error, rec.detail = f"http_{self.status}", _error_message(self.data)
            return
        try:
            body = orjson.loads(self.data)
        except orjson.JSONDecodeError:
            rec.error = "invalid_json"
            return
        rec.first_token_s = now
        rec.ok = True
        _usage(rec, body.get("usage") if isinstance(body, dict) else None, 0)


def _usage(rec: RequestRecord, usage: dict[str, Any] | None, chunks: int) -> None:
    if usage:
        rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
        rec.output_tokens = int(usage.get("completion_tokens") or chunks)
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = int(details.get("cached_tokens") or 0)
    else:
        rec.output_tokens = chunks


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-shaped error body (or the body's start)."""
    try:
        body = orjson.loads(raw)
        msg = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("message", "")
        return str(msg)[:300]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
        return raw[:300].decode("utf-8", "replace")


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (open loop may hold many connections); returns it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            new = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            return int(new)
        return int(soft)
    except (ImportError, ValueError, OSError):
        return 0


async def fetch_models(target: str, timeout_s: float = 5.0) -> list[str]:
    """Model ids the target serves (GET /v1/models); [] when it does not answer."""
    base = DriverConfig(target).base()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s, \
                s.get(f"{base}/v1/models") as r:
            if r.status != 200:
                return []
            body = orjson.loads(await r.read())
            return [m["id"] for m in body.get("data", []) if isinstance(m, dict) and "id" in m]
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError):
        return []
