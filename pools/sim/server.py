"""The engine behind an OpenAI-compatible HTTP server, on the wall clock (times a time scale).

Virtual time = (loop time - start) * time_scale. One driver task sleeps until the step in flight
ends, advances the engine and hands each request's events to the handler waiting for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pools.sim.api_request import ApiError, ParsedRequest, parse_request
from pools.sim.engine import RequestRejected, SimEngine
from pools.sim.request import EventKind, RequestEvent
from pools.sim.server_metrics import make_registry
from pools.sim.tokenizer import TextStream

log = logging.getLogger("pythia.sim")


class EngineRunner:
    """Drives a SimEngine in real time and routes its events to per-request queues."""

    def __init__(self, engine: SimEngine, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.engine = engine
        self.time_scale = time_scale
        self._queues: dict[str, asyncio.Queue[RequestEvent]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0

    def vnow(self) -> float:
        """Virtual seconds since start."""
        return (asyncio.get_running_loop().time() - self._t0) * self.time_scale

    async def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._drive())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def submit(self, parsed: ParsedRequest) -> asyncio.Queue[RequestEvent]:
        """Add a request now; its events arrive on the returned queue. Raises RequestRejected."""
        q: asyncio.Queue[RequestEvent] = asyncio.Queue()
        rid = parsed.sim.request_id
        self._queues[rid] = q
        try:
            self.engine.add_request(parsed.sim, self.vnow())
        except RequestRejected:
            del self._queues[rid]
            raise
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        """Client gone: drop the request from the engine."""
        if self._queues.pop(request_id, None) is not None:
            self.engine.abort_request(request_id, self.vnow())

    def done(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self.engine.pop_result(request_id)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        eng = self.engine
        while True:
            t_next = eng.next_event_time()
            if t_next is None:
                self._dispatch(eng.advance(self.vnow()))
                if eng.next_event_time() is None:
                    self._wake.clear()
                    await self._wake.wait()
                continue
            delay = self._t0 + t_next / self.time_scale - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._dispatch(eng.advance(max(t_next, self.vnow())))

    def _dispatch(self, events: list[RequestEvent]) -> None:
        queues = self._queues
        for ev in events:
            q = queues.get(ev.request_id)
            if q is not None:
                q.put_nowait(ev)


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _error(e: ApiError) -> web.Response:
    return web.Response(status=e.status, body=orjson.dumps(e.body()), content_type="application/json")


class SimServer:
    """aiohttp routes for one engine."""

    def __init__(self, runner: EngineRunner, preset_name: str) -> None:
        self.runner = runner
        self.engine = runner.engine
        self.registry = make_registry(runner.engine, preset_name)
        self._ids = itertools.count()
        self._created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)

        async def on_startup(_: web.Application) -> None:
            await self.runner.start()

        async def on_cleanup(_: web.Application) -> None:
            await self.runner.stop()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _models(self, _: web.Request) -> web.Response:
        name = self.engine.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.engine.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]}, dumps=lambda o: orjson.dumps(o).decode())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        prefix = "chatcmpl-" if chat else "cmpl-"
        rid = f"{prefix}{uuid.uuid4().hex}"
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(ApiError(400, "The request body is not valid JSON"))
        try:
            parsed = parse_request(
                body, chat, rid, self.engine.model_name, self.engine.config.scheduling_policy == "priority"
            )
            queue = self.runner.submit(parsed)
        except ApiError as e:
            return _error(e)
        except RequestRejected as e:
            return _error(ApiError(400, str(e)))
        finished = False
        try:
            if parsed.stream:
                resp = await self._stream(request, parsed, queue, chat, rid)
            else:
                resp = await self._unary(parsed, queue, chat, rid)
            finished = True
            return resp
        finally:
            if not finished:
                self.runner.abort(rid)
            self.runner.done(rid)

    async def _unary(
        self, parsed: ParsedRequest, queue: asyncio.Queue[RequestEvent], chat: bool, rid: str
    ) -> web.Response:
        while True:
            ev = await queue.get()
            if ev.kind is EventKind.FINISHED:
                break
        text = TextStream(self.engine.generation_seed(rid)).next_tokens(ev.output_tokens)
        usage = _usage(parsed.sim.prompt_tokens, ev.output_tokens, ev.cached_tokens)
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": ev.finish_reason,
                "stop_reason": None,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": ev.finish_reason,
                "stop_reason": None,
            }
            obj = "text_completion"
        out = {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [choice],
            "usage": usage,
        }
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        queue: asyncio.Queue[RequestEvent],
        chat: bool,
        rid: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
        )
        await resp.prepare(request)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": parsed.model}
        send: Callable[[bytes], Awaitable[None]] = resp.write
        text = None
        sent = 0
        while True:
            ev = await queue.get()
            while not queue.empty() and ev.kind is not EventKind.FINISHED:  # one chunk per step, like vLLM
                ev = queue.get_nowait()
            if ev.kind is EventKind.PREEMPTED:
                continue
            if text is None:  # vLLM sends the role chunk with the first engine output
                text = TextStream(self.engine.generation_seed(rid))
                if chat:
                    role = {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    await send(b"data: " + orjson.dumps({**head, "choices": [role]}) + b"\n\n")
            n = ev.output_tokens - sent
            if n <= 0 and ev.kind is not EventKind.FINISHED:
                continue
            sent = ev.output_tokens
            piece = text.next_tokens(n)
            reason = ev.finish_reason if ev.kind is EventKind.FINISHED else None
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": piece},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                if reason is not None:
                    choice["stop_reason"] = None
            else:
                choice = {
                    "index": 0,
                    "text": piece,
                    "logprobs": None,
                    "finish_reason": reason,
                    "stop_reason": None,
                }
            await send(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
            if ev.kind is EventKind.FINISHED:
                break
        if parsed.include_usage:
            usage = _usage(parsed.sim.prompt_tokens, ev.output_tokens, ev.cached_tokens)
            await send(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await send(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
