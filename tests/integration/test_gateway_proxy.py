"""`pythia serve` (2 workers) in front of four fake OpenAI upstreams in two pools: the happy paths and every error."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests.conftest import Proc, ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"
BODY_LIMIT = 1_000_000


@dataclass
class Cluster:
    gateway: Proc
    session_gateway: Proc
    short: list[Proc]
    long: Proc

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessGroup) -> Iterator[Cluster]:
    short = [start_fake_upstream(module_procs, n, MODEL) for n in ("a", "b", "c")]
    long = start_fake_upstream(module_procs, "long", "big-model")
    pools = [
        {"name": "short", "max_context_tokens": 16384, "models": [MODEL], "replicas": [p.url for p in short]},
        {"name": "long", "max_context_tokens": 131072, "models": [MODEL, "big-model"], "replicas": [long.url]},
    ]
    common = {"routing_headers": True, "body_limit_bytes": BODY_LIMIT}
    gw = start_gateway(module_procs, pools, workers=2, policy="round_robin", **common)
    sess = start_gateway(module_procs, pools, workers=2, policy="session", **common)
    yield Cluster(gw, sess, short, long)


def chat(content: str = "hello", stream: bool = False, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


async def post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers or {}) as r:
        return r.status, await r.read(), dict(r.headers)


async def get_bytes(url: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.read()


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_health_ready_and_models_union(cluster: Cluster) -> None:
    assert await get_bytes(cluster.url + "/health") == b'{"status":"ok"}'
    async with aiohttp.ClientSession() as s:
        async with s.get(cluster.url + "/ready") as r:
            assert r.status == 200
        async with s.get(cluster.url + "/v1/models") as r:
            ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["big-model", MODEL]


async def test_streamed_chat_is_byte_identical_to_upstream(cluster: Cluster) -> None:
    for body in (chat(stream=True), chat(stream=True, stream_options={"include_usage": True})):
        status, got, headers = await post(cluster.url + "/v1/chat/completions", body)
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        upstream_sent = await get_bytes(headers["x-pythia-replica"] + "/debug/last_response")
        assert got == upstream_sent
        assert got.endswith(b"data: [DONE]\n\n")


async def test_non_stream_chat_and_completions(cluster: Cluster) -> None:
    status, got, headers = await post(cluster.url + "/v1/chat/completions", chat())
    assert status == 200
    assert got == await get_bytes(headers["x-pythia-replica"] + "/debug/last_response")
    assert orjson.loads(got)["choices"][0]["message"]["content"].endswith(" ")
    status, got, _ = await post(cluster.url + "/v1/completions", {"model": MODEL, "prompt": "once upon"})
    assert status == 200 and orjson.loads(got)["object"] == "text_completion"
    status, got, headers = await post(cluster.url + "/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})
    assert status == 200 and got == await get_bytes(headers["x-pythia-replica"] + "/debug/last_response")


async def test_round_robin_spreads_evenly(cluster: Cluster) -> None:
    counts: Counter[str] = Counter()
    for _ in range(30):  # a new connection each time, so both workers take calls
        status, _, headers = await post(cluster.url + "/v1/chat/completions", chat())
        assert status == 200
        counts[headers["x-pythia-replica"]] += 1
    assert set(counts) == {p.url for p in cluster.short}
    # each worker rotates on its own, so totals differ by at most one per worker
    assert max(counts.values()) - min(counts.values()) <= 2


async def test_session_sticks_to_its_replica(cluster: Cluster) -> None:
    url = cluster.session_gateway.url + "/v1/chat/completions"
    for sid in ("sess-1", "sess-2", "sess-3"):
        seen = set()
        for _ in range(6):
            status, _, headers = await post(url, chat(), {"X-Pythia-Session": sid})
            assert status == 200
            seen.add(headers["x-pythia-replica"])
        assert len(seen) == 1
    # body metadata works as well as the header
    seen = set()
    for _ in range(4):
        _, _, headers = await post(url, chat(metadata={"workflow": "wf-9"}))
        seen.add(headers["x-pythia-replica"])
    assert len(seen) == 1


async def test_tags_are_stripped_and_untagged_bodies_forwarded_unchanged(cluster: Cluster) -> None:
    raw = b'{"model": "test-model",  "messages": [{"role": "user", "content": "same bytes"}]}'
    status, _, headers = await post(cluster.url + "/v1/chat/completions", raw)
    assert status == 200
    stats = orjson.loads(await get_bytes(headers["x-pythia-replica"] + "/debug/stats"))
    assert stats["last_body"].encode() == raw  # original bytes, not re-serialized

    body = chat(metadata={"app": "research", "agent": "planner", "user_key": "kept"})
    status, _, headers = await post(
        cluster.url + "/v1/chat/completions", body, {"X-Pythia-Workflow": "wf-1", "X-Pythia-App": "hdr-app"}
    )
    assert status == 200
    stats = orjson.loads(await get_bytes(headers["x-pythia-replica"] + "/debug/stats"))
    forwarded = orjson.loads(stats["last_body"])
    assert forwarded["metadata"] == {"user_key": "kept"}
    assert not any(k.lower().startswith("x-pythia") for k in stats["last_headers"])


async def test_long_prompt_goes_to_long_pool(cluster: Cluster) -> None:
    status, _, headers = await post(cluster.url + "/v1/chat/completions", chat("x" * 4 * 20000))
    assert status == 200
    assert headers["x-pythia-pool"] == "long" and headers["x-pythia-replica"] == cluster.long.url


async def test_other_v1_paths_pass_through(cluster: Cluster) -> None:
    status, got, _ = await post(cluster.url + "/v1/embeddings", {"model": "big-model", "input": "hi"})
    assert status == 200 and orjson.loads(got)["data"][0]["object"] == "embedding"
    stats = orjson.loads(await get_bytes(cluster.long.url + "/debug/stats"))
    assert stats["paths"][-1] == "/v1/embeddings"


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_request"),
        (orjson.dumps({"model": MODEL}), {}, 400, "invalid_request"),
        (orjson.dumps(chat(max_tokens=-5)), {}, 400, "invalid_request"),
        (orjson.dumps(chat(stream="yes")), {}, 400, "invalid_request"),
        (orjson.dumps({**chat(), "model": "no-such-model"}), {}, 404, "model_not_found"),
        (orjson.dumps(chat("y" * 1_200_000)), {}, 413, "request_too_large"),
        (orjson.dumps(chat("y" * 4 * 140_000)), {}, 400, "context_length_exceeded"),
        (orjson.dumps(chat()), {"X-Pythia-App": "evil\"app"}, 400, "invalid_tag"),
        (orjson.dumps(chat()), {"X-Pythia-Agent": "a" * 500}, 400, "invalid_tag"),
        (orjson.dumps(chat(metadata={"workflow": 42})), {}, 400, "invalid_tag"),
    ],
)
async def test_bad_inputs_get_openai_errors(
    cluster: Cluster, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    if code == "context_length_exceeded":
        assert len(body) < BODY_LIMIT
    got_status, got, _ = await post(cluster.url + "/v1/chat/completions", body, headers)
    assert got_status == status
    err = orjson.loads(got)["error"]
    assert err["code"] == code and err["message"] and err["type"]


async def test_metrics_count_what_happened_across_workers(cluster: Cluster) -> None:
    before = (await get_bytes(cluster.url + "/metrics")).decode()
    for _ in range(10):
        assert (await post(cluster.url + "/v1/chat/completions", chat()))[0] == 200
    for _ in range(3):
        assert (await post(cluster.url + "/v1/chat/completions", {**chat(), "model": "nope"}))[0] == 404
    after = (await get_bytes(cluster.url + "/metrics")).decode()
    ok = metric_sum(after, "pythia_requests_total", pool="short", status="200") - metric_sum(
        before, "pythia_requests_total", pool="short", status="200"
    )
    missing = metric_sum(after, "pythia_requests_total", status="404") - metric_sum(
        before, "pythia_requests_total", status="404"
    )
    assert (ok, missing) == (10, 3)
    e2e = metric_sum(after, "pythia_e2e_seconds_count", pool="short") - metric_sum(
        before, "pythia_e2e_seconds_count", pool="short"
    )
    assert e2e == 10
    assert re.search(r'pythia_replica_healthy\{pool="short",replica="http://127.0.0.1:\d+"\} 1.0', after)
    assert "pythia_predictor_stat{" in after
