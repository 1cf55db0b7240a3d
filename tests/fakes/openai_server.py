"""A small OpenAI-compatible upstream for gateway tests: deterministic answers, vLLM metric names.

`python -m tests.fakes.openai_server --port P --name NAME [--model M]`

A request body may carry a top-level `fake` object to steer the answer (the gateway forwards it
unchanged): `{"chunks": n, "delay_s": s, "status": code, "abort_after": n, "fail_names": [...]}`
(`fail_names`: servers with these --name values answer 500). `GET /debug/stats`
reports what this server saw (requests, cancelled streams, the last body received) and
`GET /debug/last_response` returns the exact bytes of the last completion it sent.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import orjson
from aiohttp import web


class FakeUpstream:
    def __init__(self, name: str, model: str) -> None:
        self.name = name
        self.model = model
        self.requests = 0
        self.cancelled = 0
        self.running = 0
        self.last_body = b""
        self.last_headers: dict[str, str] = {}
        self.last_response = b""
        self.paths: list[str] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/debug/stats", self.stats)
        app.router.add_get("/debug/last_response", self.last)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        m = f'model_name="{self.model}"'
        text = (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{{m}}} {float(self.running)}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{{m}}} 0.0\n"
            f"vllm:kv_cache_usage_perc{{{m}}} 0.25\n"
            f"vllm:prefix_cache_queries_total{{{m}}} 100.0\nvllm:prefix_cache_hits_total{{{m}}} 40.0\n"
            f"vllm:num_preemptions_total{{{m}}} 0.0\n"
            f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="1000",{m}}} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": self.name,
                "requests": self.requests,
                "cancelled": self.cancelled,
                "running": self.running,
                "last_body": self.last_body.decode(),
                "last_headers": self.last_headers,
                "paths": self.paths,
            }
        )

    async def last(self, request: web.Request) -> web.Response:
        return web.Response(body=self.last_response, content_type="application/octet-stream")

    async def embeddings(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.paths.append(request.path)
        self.last_body = await request.read()
        return web.json_response({"object": "list", "data": [{"object": "embedding", "embedding": [0.0], "index": 0}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        self.requests += 1
        self.paths.append(request.path)
        self.last_body = raw
        self.last_headers = dict(request.headers)
        body: dict[str, Any] = orjson.loads(raw)
        fake = body.get("fake") or {}
        if self.name in fake.get("fail_names", ()):
            return web.json_response({"error": {"message": "fake outage", "type": "x", "code": 500}}, status=500)
        if fake.get("status"):
            status = int(fake["status"])
            return web.json_response({"error": {"message": f"fake {status}", "type": "x", "code": status}}, status=status)
        n = int(fake.get("chunks", 4))
        delay = float(fake.get("delay_s", 0.0))
        words = [f"{self.name}-w{i} " for i in range(n)]
        rid = f"cmpl-{self.name}-{self.requests}"
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        if not body.get("stream"):
            if delay:
                self.running += 1
                try:
                    await asyncio.sleep(delay * n)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
                finally:
                    self.running -= 1
            text = "".join(words)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            obj = "chat.completion" if chat else "text_completion"
            out = orjson.dumps({"id": rid, "object": obj, "created": 1, "model": self.model, "choices": [choice], "usage": usage})
            self.last_response = out
            return web.Response(body=out, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sent: list[bytes] = []
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.running += 1
        try:
            for i, w in enumerate(words):
                if delay:
                    await asyncio.sleep(delay)
                if fake.get("abort_after") is not None and i >= int(fake["abort_after"]):
                    self.last_response = b"".join(sent)
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                delta = {"index": 0, "delta": {"content": w}} if chat else {"index": 0, "text": w}
                ev = b"data: " + orjson.dumps({"id": rid, "object": obj, "model": self.model, "choices": [delta]}) + b"\n\n"
                sent.append(ev)
                await resp.write(ev)
            tail = []
            if (body.get("stream_options") or {}).get("include_usage"):
                tail.append(b"data: " + orjson.dumps({"id": rid, "object": obj, "choices": [], "usage": usage}) + b"\n\n")
            tail.append(b"data: [DONE]\n\n")
            for ev in tail:
                sent.append(ev)
                await resp.write(ev)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
            self.last_response = b"".join(sent)
        return resp


async def serve(port: int, name: str, model: str) -> None:
    fake = FakeUpstream(name, model)
    runner = web.AppRunner(fake.app(), handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="fake")
    p.add_argument("--model", default="test-model")
    a = p.parse_args()
    asyncio.run(serve(a.port, a.name, a.model))


if __name__ == "__main__":
    main()
