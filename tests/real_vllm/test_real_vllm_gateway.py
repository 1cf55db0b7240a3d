"""`pythia serve` in front of real vLLM (CPU) replicas: the OpenAI client, exact bytes, priority, tags, load view."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.app import GATEWAY_KEY, build_app
from gateway.settings import Settings, load_pools
from tests.conftest import ProcessGroup
from tests.integration.conftest import start_gateway
from tests.real_vllm.conftest import MODEL, Replica, metric_sum, pool_of
from tests.real_vllm.tap import TcpTap, split_http_responses

pytestmark = [pytest.mark.real_vllm, pytest.mark.timeout(900)]

IGNORED = "present in the request but ignored"


def post_raw(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST JSON, return status and the whole (de-chunked) body."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 16, **extra}


def test_openai_client_chat_and_streamed_chat(vllm_replicas: list[Replica], gateways: ProcessGroup) -> None:
    gw = start_gateway(gateways, pool_of([r.url for r in vllm_replicas]), workers=1, policy="round_robin")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colors."}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.model == MODEL
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def _generation(sse: bytes) -> tuple[str, str | None]:
    """The text and finish reason an SSE stream carries; vLLM may coalesce tokens into chunks differently per run."""
    text, finish = [], None
    for line in sse.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        choice = json.loads(line[len(b"data: "):])["choices"][0]
        text.append(choice["delta"].get("content") or "")
        finish = choice.get("finish_reason") or finish
    return "".join(text), finish


def test_streamed_bytes_equal_what_vllm_sent(vllm_replicas: list[Replica], gateways: ProcessGroup) -> None:
    replica = vllm_replicas[0]
    body = chat_body("Say hello to the gateway.", stream=True, temperature=0, seed=0)
    with TcpTap(replica.port) as tap:
        gw = start_gateway(gateways, pool_of([tap.url]), workers=1, policy="round_robin")
        status, received = post_raw(gw.url + "/v1/chat/completions", body)
        assert status == 200
        time.sleep(0.2)  # let the relay thread copy the last bytes it forwarded
        sent = [
            resp_body
            for conn in tap.connections()
            for head, resp_body in split_http_responses(conn)
            if b"text/event-stream" in head
        ]
    assert len(sent) == 1
    assert received == sent[0]  # byte for byte what vLLM sent
    assert received.rstrip().endswith(b"data: [DONE]")

    # and the same generation as asking vLLM directly (same seed, greedy); chunk boundaries may differ
    status, direct = post_raw(replica.url + "/v1/chat/completions", body)
    assert status == 200
    assert _generation(received) == _generation(direct)
    assert _generation(received)[0]


def test_priority_is_forwarded_and_accepted(vllm_replicas: list[Replica], gateways: ProcessGroup) -> None:
    gw = start_gateway(gateways, pool_of([r.url for r in vllm_replicas]), workers=1, policy="round_robin")
    for prio in (-5, 0, 7):
        status, data = post_raw(gw.url + "/v1/chat/completions", chat_body("Count to three.", priority=prio))
        assert status == 200, data
        assert json.loads(data)["choices"][0]["message"]["content"]


def test_gateway_tags_never_reach_vllm_as_unknown_fields(
    vllm_replicas: list[Replica], gateways: ProcessGroup
) -> None:
    # the check can fail: vLLM does log a field it does not know
    r0 = vllm_replicas[0]
    before = r0.log_size()
    status, _ = post_raw(r0.url + "/v1/chat/completions", chat_body("hi", metadata={"app": "direct"}))
    assert status == 200
    assert IGNORED in r0.log_since(before)

    gw = start_gateway(gateways, pool_of([r.url for r in vllm_replicas]), workers=1, policy="round_robin")
    offsets = [r.log_size() for r in vllm_replicas]
    headers = {"X-Pythia-App": "tagtest", "X-Pythia-Agent": "planner"}
    bodies = [
        chat_body("hello", metadata={"app": "tagtest", "workflow": "wf-1", "agent": "planner"}),
        chat_body("hello", extra_body={"pythia_workflow": "wf-2", "pythia_session": "s-2"}),
        chat_body("hello", stream=True, metadata={"pythia_app": "tagtest", "pythia_agent": "coder"}),
        chat_body("hello", extra_body={"metadata": {"workflow": "wf-3"}}),
    ]
    for body in bodies:
        status, data = post_raw(gw.url + "/v1/chat/completions", body, headers)
        assert status == 200, data
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        extra_headers={"X-Pythia-Workflow": "wf-4"},
        extra_body={"metadata": {"app": "tagtest", "agent": "writer"}},
    )
    served = [metric_sum(r.url, "vllm:request_success_total") for r in vllm_replicas]
    assert all(s > 0 for s in served)  # round robin reached both replicas
    for r, off in zip(vllm_replicas, offsets, strict=True):
        new = r.log_since(off)
        assert IGNORED not in new, new


class _InProcessGateway:
    """The gateway's own app (build_app) run in a thread, so its load view can be read directly."""

    def __init__(self, urls: list[str]) -> None:
        self.settings = Settings.model_validate(
            {"pools": json.dumps(pool_of(urls)), "metrics_scrape_interval_s": 0.2, "health_interval_s": 0.2}
        )
        self.app = build_app(self.settings, load_pools(self.settings.pools))
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _InProcessGateway:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def replica(self, url: str) -> Any:
        return self.app[GATEWAY_KEY].replicas[url]

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.1)
        return False


def _cache_config(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{"))
    return dict(re.findall(r'(\w+)="([^"]*)"', line))


def test_gateway_load_view_reads_real_vllm_metrics(vllm_replicas: list[Replica]) -> None:
    r0 = vllm_replicas[0]
    shared = "Background: " + " ".join(f"item {i} is {i * 7 % 13}." for i in range(120))
    for q in ("first", "second"):
        status, _ = post_raw(
            r0.url + "/v1/chat/completions", chat_body(shared + " Question: " + q, max_tokens=2)
        )
        assert status == 200
    cfg = _cache_config(r0.url)
    capacity = int(cfg["num_gpu_blocks"]) * int(cfg["block_size"])
    queries = metric_sum(r0.url, "vllm:prefix_cache_queries_total")
    hits = metric_sum(r0.url, "vllm:prefix_cache_hits_total")
    assert hits > 0  # the second call reused the first one's prefix

    with _InProcessGateway([r.url for r in vllm_replicas]) as gw:
        view = gw.replica(r0.url)
        assert gw.wait_for(lambda: view.last_scrape_s > 0 and view.prefix_cache_queries >= queries)
        assert view.healthy
        assert view.kv_capacity_tokens == capacity
        assert view.prefix_cache_queries == queries
        assert view.prefix_cache_hits == hits
        assert 0.0 <= view.kv_usage < 1.0
        assert all(gw.replica(r.url).kv_capacity_tokens > 0 for r in vllm_replicas)

        # a long generation in flight shows up as a running request and KV in use
        body = chat_body("Tell a long story.", max_tokens=400, ignore_eos=True)
        worker = threading.Thread(target=post_raw, args=(r0.url + "/v1/chat/completions", body))
        worker.start()
        try:
            assert gw.wait_for(lambda: view.num_running >= 1 and view.kv_usage > 0.0, timeout=60)
        finally:
            worker.join(300)
        assert gw.wait_for(lambda: view.num_running == 0)
